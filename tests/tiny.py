"""The tests' helpers, each written once: a tiny ImageFolder, a teacher and checkpoints whose
weights the test creates (tests/conftest.py's `tiny_run` puts them together), the entry points
run as a user runs them, what the tests read back (log records, logits), and the optional
dependencies: the pins, the skips where they are missing, an environment without them."""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import PIL
import pytest
import torch
import torchvision
from packaging.requirements import Requirement
from PIL import Image

from models import reactnet_a
from models.binary import BinaryConv2d
from utils import torch_data
from utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image_folder(root, classes=3, train_per_class=4, val_per_class=3, size=32, seed=0):
    """root/train/<class>/*.png and root/val/<class>/*.png: each class a different mean colour."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = rng.normal(60 + 60 * c, 30, (size, size, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def make_teacher(path, num_classes=3, seed=0):
    """A randomly initialised torchvision resnet34 with `num_classes` outputs, saved as a state_dict."""
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet34(num_classes=num_classes).state_dict(), path)
    return str(path)


def make_checkpoint(path, step, num_classes=3, **entries):
    """A checkpoint of this repository's layout for `step` (random weights) with `entries` besides."""
    model = reactnet_a(binary_weights=step == 2, num_classes=num_classes)
    torch.save({"step": step, "state_dict": model.state_dict(), **entries}, path)
    return str(path)


def randomize(model, seed=0):
    """Non-trivial BN statistics and affine, move biases and PReLU slopes, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point() and not isinstance(model.get_submodule(name.rpartition(".")[0]),
                                                          BinaryConv2d):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return model.eval()


def logits(model, x):
    """The eval-mode model's output, without autograd."""
    with torch.no_grad():
        return model.eval()(x)


def max_rel_error(actual, expected) -> float:
    """Largest logit difference of an image relative to its largest |logit|, over the batch."""
    return ((actual - expected).abs().amax(1) / expected.abs().amax(1)).max().item()


def records(save) -> list:
    """The epoch records of a run's log.jsonl."""
    with open(os.path.join(save, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def env(**extra):
    """The test's environment without torchrun variables; one process unless NPROC_PER_NODE given."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES")}
    e.update({"PYTHON": sys.executable, "NPROC_PER_NODE": "1", **extra})
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, cwd=ROOT, check=True, timeout=600, **extra_env):
    """Run a command list; returns CompletedProcess with text stdout/stderr."""
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env(**extra_env), capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def wait_for_line(proc, text, timeout=300):
    """Read proc's stdout until a line contains `text`; returns what was read."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"no line with {text!r}:\n{''.join(seen)[-2000:]}")


def tiny_flags(data, save, *flags) -> list:
    """Tiny settings (no workers, 32x32, 1 epoch) plus `flags`, which override them (the last of
    a flag counts)."""
    tiny = ["--data", data, "--save", save, "--epochs", "1", "--batch_size", "4", "-j", "0",
            "--input-size", "32", "--print-freq", "1"]
    return [str(c) for c in [*tiny, *flags]]


def step_command(n, data, save, *flags) -> list:
    """bash stepN/run.sh with tiny_flags."""
    return ["bash", os.path.join(ROOT, f"step{n}", "run.sh"), *tiny_flags(data, save, *flags)]


def step(n, data, save, *flags, cwd=ROOT, check=True, **extra_env):
    """Run step_command(n, data, save, *flags)."""
    return run(step_command(n, data, save, *flags), cwd=cwd, check=check, **extra_env)


def train_here(n, data, save, *flags, check=True):
    """`python -m utils.train --step n` with tiny_flags, in this process: what run.sh's process
    runs, without the launcher and its start-up (the tests of the launcher go through step());
    returns a CompletedProcess of its exit code and its output."""
    from utils import train
    argv = ["--step", str(n), *tiny_flags(data, save, *flags)]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            train.main(argv)
        except SystemExit as e:
            code = e.code
    p = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check and code:
        raise AssertionError(f"{argv} failed ({code}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def requirements(name="requirements.txt") -> dict:
    """{project name in lower case: Requirement} of a requirements file of the repository, with
    the files it includes (-r)."""
    found = {}
    with open(os.path.join(ROOT, name)) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line.startswith("-r "):
                found.update(requirements(line[3:].strip()))
            elif line:
                req = Requirement(line)
                found[req.name.lower()] = req
    return found


def torchcodec_missing() -> str:
    """'' where the torch data backend decodes here, else the one line of utils.torch_data that
    says what to install."""
    try:
        torch_data.check_decoder()
    except ConfigError as e:
        return str(e)
    return ""


PILLOW = str(requirements()["pillow"].specifier).removeprefix("==")
# The tests that need TorchCodec (the torch data backend), and those whose exact pixels are the
# pinned Pillow's: utils.torch_data reproduces Pillow's resize, and decodes as its libjpeg-turbo.
needs_torchcodec = pytest.mark.skipif(bool(torchcodec_missing()), reason=torchcodec_missing())
pinned_pillow = pytest.mark.skipif(
    PIL.__version__ != PILLOW, reason=f"the torch data backend's pixels are Pillow {PILLOW}'s bit for bit (the "
    f"version requirements.txt pins), and this is Pillow {PIL.__version__}")


def without(folder, *modules) -> str:
    """A PYTHONPATH on which importing any of `modules` fails as where it is not installed, the
    test's own PYTHONPATH after it."""
    for module in modules:
        os.makedirs(os.path.join(folder, module), exist_ok=True)
        with open(os.path.join(folder, module, "__init__.py"), "w") as f:
            f.write(f"raise ModuleNotFoundError({f'No module named {module!r}'!r})\n")
    return os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])


if __name__ == "__main__":
    # torchrun worker of tests/test_distributed.py: train through utils.train, then save this
    # rank's final weights to OUT/rank<R>.pth.   python -m tests.tiny OUT [training flags]
    from utils.config import get_parser, resolve_args
    from utils.train import train

    out = sys.argv[1]
    student = train(resolve_args(get_parser().parse_args(sys.argv[2:])))
    torch.save(student.state_dict(), os.path.join(out, f"rank{os.environ.get('RANK', 0)}.pth"))
