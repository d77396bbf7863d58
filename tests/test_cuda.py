"""The CUDA tier: what only a GPU shows, in about five minutes on one H100 or H200, compilation
included (an estimate: not run on a GPU yet). Skipped without a GPU, as in CI.

    python -m pytest -q -m cuda tests

On small generated JPEGs, one GPU:
- test_model_in_float64_is_the_authors_network: ReActNet-A on CUDA in float64 gives the logits
  and gradients of the authors' network (tests/fixtures/reactnet_a_seed0.json) within 1e-8.
- test_packed_network_gives_the_float64_logits: the packed 1-bit file (utils.export) loaded onto
  CUDA gives the float64 model's logits within the CPU's bound (1e-5) and the CPU's top-1.
- test_nvjpeg_batches_against_pil: the torch backend's batches (nvjpeg on CUDA) against the PIL
  backend's, same samples: max and mean pixel difference printed, bounded (MEAN_BOUND, MAX_BOUND).
- test_steps_and_evaluate_with_the_cuda_defaults[pil, torch]: bash step1/run.sh, then step2/run.sh,
  then evaluate.py, with the CUDA defaults: NCCL, torch.compile (inductor), channels_last, fp32.
- test_sigterm_mid_epoch_and_relaunch: a SIGTERM mid-epoch saves; the same command again finishes
  the run with every epoch and every image of the interrupted epoch.
- test_compiled_ddp_recompilations: TORCH_LOGS=recompiles over a compiled DDP run of two epochs:
  at most RECOMPILE_BOUND recompilations, none in the second epoch.
- test_end_to_end_throughput: images/s of the training loop fed by each data backend (utils.bench
  end-to-end), printed, not asserted.
Results are printed to the terminal whatever pytest's capture (-s or not).
"""
import copy
import json
import os
import re
import signal
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from models import reactnet_a
from tests.test_checkpoint import LAYOUTS
from tests.test_export import RTOL as PACKED_RTOL
from tests.test_model import FIXTURE, fixture_outputs
from tests.tiny import (ROOT, env, logits, make_teacher, max_rel_error, needs_torchcodec, randomize, records, run,
                        step, step_command, wait_for_line)
from utils import data, export, recipe, torch_data
from utils.bench.__main__ import main as bench
from utils.checkpoint import read_checkpoint
from utils.config import parse_args, resolve_args
from utils.distill import DistributionLoss, build_teacher
from utils.distributed import broadcast_buffers, cleanup, init_distributed
from utils.engine import LoopSettings, evaluate, train_one_epoch
from utils.loaders import build_loader
from utils.precision import memory_format, set_precision, using
from utils.preempt import EXIT_PREEMPTED

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

INPUT = 64             # training crop; the JPEGs are 96x64
TRAIN, VAL = 48, 4     # images per class, 2 classes: 24 batches of 4 per epoch, 2 validation batches
FLOAT64_RTOL = 1e-8
# nvjpeg is not libjpeg-turbo: its inverse DCT and chroma upsampling may round differently, so the
# torch backend's pixels on CUDA differ slightly from the PIL backend's (on the CPU they are equal).
# Bounds in pixel values (0-255), chosen conservatively before any measurement: the mean is
# torchvision's own bound for nvjpeg against libjpeg-turbo; the max allows rare larger roundings
# while still catching a misplaced crop, flip or colour offset.
MEAN_BOUND, MAX_BOUND = 2.0, 64
# Expected: one, the student's forward compiled again for validation (eval mode, no grad); the
# rest is margin. A recompilation storm would grow with every epoch.
RECOMPILE_BOUND = 4


def make_photos(folder, count: int, seed: int):
    """`count` 96x64 RGB JPEGs (whole 16x16 blocks; quality 90, 4:2:0) with a photograph's
    statistics: smooth colour, luminance texture."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    for i in range(count):
        colour = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).resize((96, 64), Image.BICUBIC)
        texture = rng.normal(0, 20, (64, 96, 1))
        pixels = np.clip(np.asarray(colour, dtype=np.float32) + texture, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.JPEG"), quality=90)


class Jpegs(NamedTuple):
    root: str     # train/ and val/, 2 classes of TRAIN and VAL JPEGs
    teacher: str  # the weights of a 2-class teacher


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    for split, count in (("train", TRAIN), ("val", VAL)):
        for c in range(2):
            make_photos(root / "data" / split / f"class{c}", count, seed=10 * c + count)
    return Jpegs(str(root / "data"), make_teacher(root / "teacher.pth", num_classes=2))


def report(capsys, line):
    with capsys.disabled():
        print(f"\n{line}", flush=True)


@pytest.mark.parametrize("step", [1, 2])
def test_model_in_float64_is_the_authors_network(step):
    with open(FIXTURE) as f:
        fixture = json.load(f)
    expected = fixture[f"step{step}"]
    eval_logits, train_logits, grads = fixture_outputs(fixture, step, "cuda")
    for what, actual in (("eval_logits", eval_logits), ("train_logits", train_logits)):
        target = torch.tensor(expected[what], dtype=torch.float64)
        assert ((actual - target).abs() / target.abs()).max() <= FLOAT64_RTOL, what
    assert grads.keys() == expected["grad_sum_norm"].keys()
    for name, grad in grads.items():
        grad_sum, grad_norm = expected["grad_sum_norm"][name]
        # A sum can be near zero by cancellation: its error is measured against the norm.
        assert abs(grad.sum().item() - grad_sum) <= FLOAT64_RTOL * grad_norm, name
        assert abs(grad.norm().item() - grad_norm) <= FLOAT64_RTOL * grad_norm, name


def test_packed_network_gives_the_float64_logits(tmp_path):
    torch.manual_seed(0)
    model = randomize(reactnet_a(binary_weights=True, num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    expected = logits(copy.deepcopy(model).double(), x.double())
    torch.save(LAYOUTS["this-repo"](model), tmp_path / "ckpt.pth.tar")
    export.export(tmp_path / "ckpt.pth.tar", tmp_path / "packed.pt")
    with using("fp32"):  # the float parts (stem, fc) without TF32, as on the CPU
        on_cuda = logits(export.load_packed(tmp_path / "packed.pt", device="cuda"), x.cuda()).cpu()
    on_cpu = logits(export.load_packed(tmp_path / "packed.pt"), x)
    assert max_rel_error(on_cuda.double(), expected) < PACKED_RTOL
    assert torch.equal(on_cuda.argmax(1), on_cpu.argmax(1))
    assert torch.equal(on_cuda.argmax(1), expected.argmax(1))


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """A normalized batch back to the pixel values (0-255, float, on the CPU) it was made from."""
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    return (images.cpu() * std + mean) * 255


@needs_torchcodec
def test_nvjpeg_batches_against_pil(jpegs, capsys):
    root = jpegs.root
    pairs = {"train": (torch_data.torch_train_loader(root, 8, 0, seed=1, input_size=INPUT),
                       data.train_loader(root, 8, 0, seed=1, input_size=INPUT)),
             "val": (torch_data.torch_val_loader(root, 8, 0, input_size=INPUT),
                     data.val_loader(root, 8, 0, input_size=INPUT))}
    for split, ((loader, prepare), pil) in pairs.items():  # (training: epoch 0's samples)
        differences = []
        for batch, (images, target, _) in zip(loader, pil, strict=True):
            on_cuda = prepare(batch, "cuda")
            assert on_cuda.images.is_cuda and on_cuda.bad == [] and torch.equal(on_cuda.target.cpu(), target)
            differences.append((pixel_values(on_cuda.images) - pixel_values(images)).abs())
        counts = prepare.take_counts()
        assert counts["cpu_decoded"] == 0 and counts["batch_decode_failures"] == 0  # all by nvjpeg
        difference = torch.cat(differences)
        worst, mean = difference.max().item(), difference.mean().item()
        report(capsys, f"nvjpeg (CUDA) vs PIL, {split}: {counts['decoded']} images at {INPUT}x{INPUT}, "
                       f"pixel difference max {worst:.2f}, mean {mean:.4f} (bounds {MAX_BOUND}, {MEAN_BOUND})")
        assert mean <= MEAN_BOUND and worst <= MAX_BOUND, split


def assert_trained(save, epochs: int):
    """`epochs` epochs in log.jsonl, finite losses, every training and validation image counted."""
    rows = records(save)
    assert [r["epoch"] for r in rows] == list(range(epochs))
    for r in rows:
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"])
        assert round(r["images_per_s"] * r["epoch_time"]) == 2 * TRAIN and r["val_images"] == 2 * VAL


def flags(jpegs, backend) -> list:
    """The tier's training flags over tests.tiny's; the rest are the CUDA defaults."""
    return ["--teacher-weights", jpegs.teacher, "--data-backend", backend, "-j", "2", "--input-size", str(INPUT)]


@pytest.mark.parametrize("backend", ["pil", pytest.param("torch", marks=needs_torchcodec)])
def test_steps_and_evaluate_with_the_cuda_defaults(jpegs, tmp_path, backend):
    s1 = step(1, jpegs.root, tmp_path / "s1", *flags(jpegs, backend), "--epochs", "2", NCCL_DEBUG="VERSION")
    s2 = step(2, jpegs.root, tmp_path / "s2", *flags(jpegs, backend), "--init-checkpoint",
              tmp_path / "s1" / "model_best.pth.tar", NCCL_DEBUG="VERSION")
    for p in (s1, s2):
        assert "=> --precision fp32, channels_last on, compile inductor" in p.stdout
        assert "NCCL version" in p.stdout + p.stderr  # NCCL_DEBUG=VERSION: the NCCL process group
        assert "not nvjpeg-decodable" not in p.stdout  # (torch) every image decoded by nvjpeg
    assert_trained(tmp_path / "s1", 2)
    assert_trained(tmp_path / "s2", 1)
    results = tmp_path / "results.jsonl"
    p = run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", tmp_path / "s2" / "model_best.pth.tar",
             "--data", jpegs.root, "--data-backend", backend, "-j", "2", "--batch_size", "4",
             "--results-file", results])
    assert f"input size {INPUT} (from the checkpoint)" in p.stdout
    row = json.loads(results.read_text())
    assert row["images"] == 2 * VAL
    # Eager here, compiled in training, other cuDNN algorithms: a sign decided by a rounding may
    # change one image's class.
    assert abs(row["top1"] - records(tmp_path / "s2")[0]["val_top1"]) <= 100 / (2 * VAL)


@needs_torchcodec
def test_sigterm_mid_epoch_and_relaunch(jpegs, tmp_path):
    save = tmp_path / "s1"
    cmd = step_command(1, jpegs.root, save, *flags(jpegs, "torch"), "--epochs", "2")
    with open(tmp_path / "stderr.txt", "w") as err:  # a file: a full pipe would block the run
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=err, text=True)
        wait_for_line(proc, "Epoch: [0][ 2/24]", timeout=600)  # past the compilation
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, (tmp_path / "stderr.txt").read_text()
    assert "stopped by SIGTERM in epoch 0" in (tmp_path / "stderr.txt").read_text()
    ckpt = read_checkpoint(save / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 0 and 3 <= ckpt["iteration"] < 24
    p = run(cmd)  # the same command again
    assert f"0 epochs and {ckpt['iteration']} iterations of epoch 0 done" in p.stdout
    assert_trained(save, 2)


def test_compiled_ddp_recompilations(jpegs, tmp_path, capsys):
    """One GPU cannot hold two NCCL processes, and utils/train.py wraps the student in DDP only for
    several: compiled_ddp_epochs (below) wraps it in DDP in a one-process NCCL group, as training
    does for several, so that the compiled graphs are those of a multi-GPU run (DDP's graph split
    at its buckets included)."""
    p = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
             "-m", "tests.test_cuda", "--step", "1", "--data", jpegs.root, "--save", tmp_path / "s1",
             "--batch_size", "4", *flags(jpegs, "pil"), "--epochs", "2"],
            PYTHONPATH=ROOT, TORCH_LOGS="recompiles")
    counts = [part.count("Recompiling function") for part in re.split(r"=> epoch \d done", p.stderr)[:2]]
    report(capsys, f"compiled DDP, TORCH_LOGS=recompiles: {counts[0]} recompilation(s) in epoch 0, "
                   f"{counts[1]} in epoch 1 (bound {RECOMPILE_BOUND}, 0)")
    assert "=> epoch 1 done" in p.stderr
    assert sum(counts) <= RECOMPILE_BOUND and counts[1] == 0, p.stderr[-5000:]


def compiled_ddp_epochs(argv):
    """torchrun worker of test_compiled_ddp_recompilations, given training flags: utils/train.py's
    student, teacher and optimizer, the student wrapped in DDP and compiled as training does with
    several processes, then its epoch loop (train_one_epoch, broadcast_buffers, evaluate) without
    schedule or checkpoints; '=> epoch N done' on stderr after each epoch."""
    args = resolve_args(parse_args(argv))
    info = init_distributed()
    torch.backends.cudnn.benchmark = True
    set_precision(args.precision)
    loader, prepare = build_loader("train", args.data_backend, args.data, args.batch_size, info,
                                   workers=args.workers, input_size=args.input_size, seed=args.seed)
    val_loader, prepare_val = build_loader("val", args.data_backend, args.data, args.batch_size, info,
                                           workers=args.workers, input_size=args.input_size)
    classes = len(loader.dataset.classes)
    teacher = build_teacher(args.teacher, args.teacher_weights, classes, print)
    torch.manual_seed(args.seed)
    student = reactnet_a(binary_weights=recipe.STEPS[args.step]["binary_weights"], num_classes=classes)
    optimizer = recipe.build_optimizer(student, args.optimizer, args.learning_rate, args.weight_decay)
    student.to(info.device, memory_format=memory_format(args.channels_last))
    teacher.to(info.device, memory_format=memory_format(args.channels_last))
    ddp = nn.parallel.DistributedDataParallel(
        student, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    model, eval_model, teacher = [torch.compile(m, backend=args.compile) for m in (ddp, student, teacher)]
    settings = LoopSettings(device=info.device, precision=args.precision, channels_last=args.channels_last,
                            world_size=info.world_size)
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        train_one_epoch(model, teacher, loader, DistributionLoss(), optimizer, epoch, settings, prepare=prepare)
        broadcast_buffers(student)
        evaluate(eval_model, val_loader, settings, prepare=prepare_val)
        print(f"=> epoch {epoch} done", file=sys.stderr, flush=True)
    cleanup()


@needs_torchcodec
def test_end_to_end_throughput(capsys):
    with capsys.disabled():  # the table, to the terminal
        res = bench(["end-to-end", "--device", "cuda", "--batch-size", "32", "--input-size", str(INPUT),
                     "--images", "128", "--image-size", "96x64", "-j", "4", "--iterations", "8", "--warmup", "2"])
    assert [r["pipeline"] for r in res["rows"]] == ["model only", "pil", "torch"]
    assert res["rows"][2]["counts"]["cpu_decoded"] == 0  # the torch backend decoded with nvjpeg


if __name__ == "__main__":
    compiled_ddp_epochs(sys.argv[1:])
