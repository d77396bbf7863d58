"""Every command in README.md and docs/*.md is checked, so that a renamed module or flag cannot
leave a dead command behind.

Each fenced `bash` block is split into commands, and each command goes to the check of the
program it calls; a command no check knows fails the test (add its check). The documented
command itself is checked, with its placeholders (/path/to/imagenet, FILE, ...) replaced by small
generated files:
- run on a CPU, on tiny data: `evaluate.py`, `python -m utils.export` (exporting; `--benchmark`
  with tiny sizes appended), `python -m utils.ops`, `python -m utils.bench loader|precision`
  (tiny sizes appended), `python -m utils.demo.digits export`;
- parsed by the program's own flag checks, the ones its launcher applies before anything starts:
  training (`bash stepN/run.sh`, `python -m utils.train`; their tiny runs through the same entry
  points are tests/test_pipeline.py and tests/test_faults.py), evaluation on several GPUs, the
  benchmarks that compile or run long, the analysis tools (`utils.analysis.findings` runs for
  20 minutes), the demo (`bash -n`, and its tiny run is too long for the suite);
- the set-up and test commands are the ones `.ci/run` runs; the other `pip` commands (installing
  into an existing environment, the wheels of the CUDA tier) are parsed by pip's own parser and
  name the files and pins of the requirements.
Fenced `python` blocks are compiled, and what they import must exist.
"""
import ast
import glob
import importlib
import importlib.metadata
import json
import os
import re
import shlex
import subprocess

import pytest
import torch
from packaging.requirements import Requirement

import evaluate
from models import reactnet_a
from tests.tiny import ROOT, make_image_folder, requirements
from utils import config, export, ops, torch_data
from utils.bench.__main__ import get_parser as bench_parser
from utils.run_folder import save_checkpoint

DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
DATA_PLACEHOLDERS = {"/path/to/imagenet", "/imagenet", "DIR", "demo_output/data"}
CHECKPOINT_PLACEHOLDERS = {"FILE", "CKPT", "step2/output/model_best.pth.tar",
                           "demo_output/step2/model_best.pth.tar", "step1/output/model_best.pth.tar",
                           "demo_output/step1/model_best.pth.tar", "path/to/checkpoint.pth.tar"}
PACKED_PLACEHOLDERS = {"reactnet_a_1bit.pt"}
FILE_PLACEHOLDERS = {"/path/to/real.json": "real", "/path/to/class_map.txt": "class_map"}  # -> files[...]
SHELL_WORDS = {"if", "then", "fi", "[", "]", "scontrol"}  # the SLURM requeue example's own syntax


def fenced(path: str, language: str) -> list:
    """The fenced blocks of `language` in the markdown file, as (path, text)."""
    text = open(path).read()
    return [(path, block) for block in re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)]


def commands(block: str) -> list:
    """The commands of a bash block: continuation lines joined, comments dropped, split at ';',
    '&&' and '||'; each as (environment assignments, words)."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words = []
        for token in list(lexer) + [";"]:
            if token in (";", "&&", "||"):
                if words:
                    found.append(words)
                words = []
            else:
                words.append(token)
    result = []
    for words in found:
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words:
            result.append((env, words))
    return result


def all_commands() -> list:
    return [(os.path.relpath(path, ROOT), env, words)
            for path in DOCS for _, block in fenced(path, "bash") for env, words in commands(block)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny data (3 classes, 32x32; the validation images named as ImageNet's) and what the commands
    read: a step-2 checkpoint of this repository trained at 32x32 (random weights), its packed
    file, ImageNet-ReaL labels of the images, a class map of the folders."""
    root = tmp_path_factory.mktemp("docs")
    data = make_image_folder(root / "data", classes=3, train_per_class=2, val_per_class=2)
    val = sorted(glob.glob(os.path.join(data, "val", "*", "*.png")))
    for number, path in enumerate(val, start=1):
        os.rename(path, os.path.join(os.path.dirname(path), f"ILSVRC2012_val_{number:08d}.png"))
    (root / "real.json").write_text(json.dumps([[number % 3] for number in range(len(val))]))
    (root / "class_map.txt").write_text("class0\nclass1\nclass2\n")
    torch.manual_seed(0)
    model = reactnet_a(binary_weights=True, num_classes=3)
    save_checkpoint({"step": 2, "epoch": 1, "state_dict": model.state_dict(), "best_top1_acc": 0.0,
                     "args": {"input_size": 32}}, str(root / "ckpt"), is_best=False)
    checkpoint = str(root / "ckpt" / "checkpoint.pth.tar")
    packed = str(root / "packed.pt")
    export.export(checkpoint, packed)
    return {"root": root, "data": data, "checkpoint": checkpoint, "packed": packed, "real": str(root / "real.json"),
            "class_map": str(root / "class_map.txt")}


def substituted(words: list, files, out=None) -> list:
    """The words with the placeholders replaced by the generated files (`--out` by `out`)."""
    result = []
    for i, word in enumerate(words):
        if word in FILE_PLACEHOLDERS:
            word = files[FILE_PLACEHOLDERS[word]]
        elif word in DATA_PLACEHOLDERS or word.startswith("/path/to/imagenet"):
            word = files["data"]
        elif word in CHECKPOINT_PLACEHOLDERS:
            word = files["checkpoint"]
        elif word in PACKED_PLACEHOLDERS:
            word = files["packed"] if out is None or i == 0 or words[i - 1] != "--out" else out
        elif i and words[i - 1] == "--out" and out is not None:
            word = out
        result.append(word)
    return result


def module_args(words: list, module: str) -> list | None:
    """The arguments of `python -m module ...`, else None."""
    if words[:3] in (["python", "-m", module], ["python3", "-m", module]):
        return words[3:]
    return None


# ---------------------------------------------------------------------------------------------
# The checks, one per program


def check_training(env, args, files):
    """The launcher's own checks: the flags parsed with the step's defaults and resolved for the
    number of processes the environment asks for."""
    world_size = int(env.get("NPROC_PER_NODE", 8 if "NNODES" in env else 1)) * int(env.get("NNODES", 1))
    if "--help" in args:
        config.parse_args(args[:args.index("--help")])
        return
    resolve = dict(env)
    parsed = config.parse_args(args)
    parsed.data = parsed.data or resolve.get("DATA") or files["data"]
    parsed.save = str(files["root"] / "save")  # the defaults (stepN/output) stay untouched
    config.resolve_args(parsed, world_size=world_size)


def run_evaluate(args, files, capsys):
    stats = evaluate.main(substituted(args, files))
    assert stats.count == 6 and "* Acc@1" in capsys.readouterr().out


def check(where, env, words, files, capsys, tmp_path):
    """Check one documented command; returns what was done ('run' or 'parsed')."""
    if words[0] == "srun":
        words = words[1:]
    if words[0] in SHELL_WORDS or (len(words) == 1 and re.fullmatch(r"\w+=\$\?", words[0])):
        return "shell"
    if words[0] == "bash" and re.fullmatch(r"step[12]/run\.sh", words[1]):
        check_training(env, ["--step", words[1][4], *substituted(words[2:], files)], files)
        return "parsed"
    if words[:2] == ["bash", "demo.sh"]:
        subprocess.run(["bash", "-n", os.path.join(ROOT, "demo.sh")], check=True)
        return "parsed"
    if (args := module_args(words, "utils.train")) is not None:
        check_training(env, args, files)
        return "parsed"
    if words[0] in ("python", "python3") and words[1] == "evaluate.py":
        run_evaluate(words[2:], files, capsys)
        return "run"
    if (args := module_args(words, "torch.distributed.run")) is not None:
        script = next(i for i, w in enumerate(args) if w.endswith(".py"))
        assert args[script] == "evaluate.py", where
        evaluate.check_args(evaluate.get_parser().parse_args(substituted(args[script + 1:], files)))
        return "parsed"
    if (args := module_args(words, "utils.export")) is not None:
        args = substituted(args, files, out=str(tmp_path / "out.pt"))
        if "--benchmark" in args:
            args += ["--input-size", "32", "--batch-sizes", "1", "--rounds", "1", "--threads", "1", "--no-compile",
                     "--no-load"]
        export.main(args)
        return "run"
    if (args := module_args(words, "utils.ops")) is not None:
        ops.main(substituted(args, files))
        return "run"
    if (args := module_args(words, "utils.bench")) is not None:
        parsed = bench_parser().parse_args(substituted(args, files))
        if args[0] == "loader":
            bench_run(args + ["--images", "2", "--image-size", "64x48", "--input-size", "32", "--reps", "1"])
            return "run"
        if args[0] == "precision" and "--device" not in args:
            bench_run(args + ["--batch-size", "2", "--resolution", "32", "--steps", "2", "--num-classes", "10"])
            return "run"
        assert parsed.run
        return "parsed"
    if (args := module_args(words, "utils.demo.digits")) is not None:
        if args[0] == "export":
            from utils.demo import digits
            digits.main(["export", "--out", str(tmp_path / "digits"), *args[args.index("--out") + 2:]])
            return "run"
    for module in ("utils.analysis.findings", "utils.analysis.landscape"):
        if (args := module_args(words, module)) is not None:
            importlib.import_module(module).get_parser().parse_args(substituted(args, files))
            return "parsed"
    if words[0] == "pip" and words[1:] != ["install", "-r", "requirements.txt"]:
        check_pip(words)
        return "parsed"
    if words[:3] == ["python", "-m", "pytest"] or words[0] in ("python3", ".", "pip"):
        ci = open(os.path.join(ROOT, ".ci", "run")).read()
        assert " ".join(words) in ci or words[-1] == "tests", f"{where}: {words} is not what .ci/run runs"
        if "-m" in words[3:]:
            marker = words[words.index("-m", 3) + 1]
            assert marker in open(os.path.join(ROOT, "pytest.ini")).read(), marker
        return "parsed"
    raise AssertionError(f"{where}: no check for the documented command {' '.join(words)!r}: add one to "
                         "tests/test_docs.py")


def check_pip(words):
    """pip's own parser takes the command; the requirement files it names exist, and each package
    it names is in requirements.txt, at its pin where it has one."""
    from pip._internal.commands import create_command
    options, names = create_command(words[1]).parse_args(words[2:])
    for path in getattr(options, "requirements", []):
        assert os.path.isfile(os.path.join(ROOT, path)), path
    pins = requirements()
    for name in names:
        req = Requirement(name)
        assert req.name.lower() in pins and req.specifier in ("", pins[req.name.lower()].specifier), name


def bench_run(args):
    from utils.bench.__main__ import main
    main(args)


@pytest.mark.parametrize("where, env, words", all_commands(),
                         ids=[f"{w}:{' '.join(c)[:60]}" for w, _, c in all_commands()])
def test_documented_command(where, env, words, files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(files["root"])  # relative outputs of a documented command land here
    check(where, env, words, files, capsys, tmp_path)


def test_setup_and_test_commands_are_what_ci_runs():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    readme = "".join(block for _, block in fenced(DOCS[0], "bash"))
    for line in ("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt",
                 "python -m pytest -q tests"):
        assert line in readme and line in ci


def dependencies(name: str) -> set:
    """The installed distribution `name` and all it depends on, installed, in lower case."""
    found, todo = set(), [name]
    while todo:
        dist = todo.pop().lower().replace("_", "-")
        if dist in found:
            continue
        found.add(dist)
        for line in importlib.metadata.requires(dist) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def test_requirements_are_the_no_torch_ones_and_the_pins():
    everything, rest = requirements(), requirements("requirements-no-torch.txt")
    pinned = {"torch", "torchvision", "torchcodec"}
    assert set(everything) - set(rest) == pinned and all(everything[p].specifier for p in pinned)
    assert {n: everything[n] for n in rest} == rest
    assert str(everything["torchcodec"]) == torch_data.TORCHCODEC  # what its one line says to install
    for name in rest:  # nor does anything they depend on bring a torch
        assert not dependencies(name) & pinned, name


PYTHON_BLOCKS = [b for path in DOCS for b in fenced(path, "python")]


@pytest.mark.parametrize("path, block", PYTHON_BLOCKS, ids=[os.path.relpath(p, ROOT) for p, _ in PYTHON_BLOCKS])
def test_documented_python(path, block):
    tree = ast.parse(block)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{path}: {node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


def test_docs_link_to_files_that_exist():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", open(path).read()):
            assert os.path.exists(os.path.join(os.path.dirname(path), target)), f"{path}: {target}"
