"""End to end through the real entry points: bash step1/run.sh, bash step2/run.sh, evaluate.py,
python -m utils.export, on a tiny ImageFolder with a teacher whose weights the test creates; with
the default (pil) data backend, all of them as where TorchCodec is not installed."""
import json
import os
import re
import sys

import pytest
import torch

from models import reactnet_a
from tests.tiny import ROOT, needs_torchcodec, records, run, step, without
from utils.checkpoint import read_checkpoint


def acc1_of(stdout):
    return [float(x) for x in re.findall(r"^\* Acc@1 ([\d.]+) Acc@5 [\d.]+", stdout, re.M)]


@pytest.fixture(scope="module")
def no_torchcodec(tmp_path_factory) -> str:
    """The PYTHONPATH of an environment without TorchCodec."""
    return without(tmp_path_factory.mktemp("blocked"), "torchcodec")


@pytest.fixture(scope="module")
def pipeline(tiny_run, no_torchcodec):
    # 6 train images: batches of 4 and 2; 9 val images.
    tiny = tiny_run(classes=3, train_per_class=2, val_per_class=3)
    root, teacher = tiny.root, tiny.teacher
    # Step 1 from a user's own folder with relative paths; 2 epochs so that the first trains at lr > 0.
    s1 = step(1, "data", "s1", "--epochs", "2", "--teacher-weights", "teacher.pth", cwd=root,
              PYTHONPATH=no_torchcodec)
    # Step 2 from inside step2/, workers > 0, the analysis on.
    s2 = step(2, str(root / "data"), str(root / "s2"), "--teacher-weights", teacher,
              "--init-checkpoint", str(root / "s1" / "model_best.pth.tar"), "-j", "1",
              "--analysis-every", "2", cwd=os.path.join(ROOT, "step2"), PYTHONPATH=no_torchcodec)
    return root, s1, s2


def test_step1_outputs(pipeline):
    root, s1, _ = pipeline
    save = root / "s1"
    assert {"checkpoint.pth.tar", "model_best.pth.tar", "args.json", "log.jsonl", "log.txt",
            "tensorboard"} <= set(os.listdir(save))
    assert os.listdir(save / "tensorboard")
    assert not [f for f in os.listdir(save) if f.endswith(".tmp")]
    ckpt = read_checkpoint(save / "checkpoint.pth.tar")  # weights_only=True
    assert ckpt["epoch"] == 2 and ckpt["step"] == 1 and ckpt["arch"] == "reactnet_a"
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert {"optimizer", "rng", "args", "git_commit", "best_top1_acc", "init_seed"} <= set(ckpt)
    assert ckpt["classes"] == ["class0", "class1", "class2"] and ckpt["args"]["weight_decay"] == 5e-6
    lines = records(save)
    assert [r["epoch"] for r in lines] == [0, 1]
    assert [r["lr"] for r in lines] == pytest.approx([1.25e-3 / 2, 0.0])
    assert all(r["val_images"] == 9 for r in lines)
    assert acc1_of(s1.stdout) == pytest.approx([r["val_top1"] for r in lines], abs=1e-3)
    assert ckpt["best_top1_acc"] == max(r["val_top1"] for r in lines)
    args = json.load(open(save / "args.json"))
    assert args["git_commit"] and args["data"] == "data" and args["save"] == str(save)
    assert re.search(r"Epoch: \[0\]\[0/2\]\tTime .*\tData .*\tLoss .*\tAcc@1 .*\tAcc@5 .*\tlr .*img/s .*ETA",
                     s1.stdout)
    # Validation's progress, every --print-freq (1) batches: 9 images in batches of 4.
    line = r"^Test: \[([0-2])/3\]\tTime .*\tData .*\timg/s .*\tETA \d+:\d\d:\d\d$"
    assert re.findall(line, s1.stdout, re.M) == ["0", "1", "2"] * 2
    # Step 1 really trained: the block convs moved away from the seeded initialisation.
    torch.manual_seed(0)
    init = reactnet_a(binary_weights=False, num_classes=3).state_dict()
    assert not torch.equal(init["feature.1.binary_3x3.weight"], ckpt["state_dict"]["feature.1.binary_3x3.weight"])


def test_step2_starts_from_step1(pipeline):
    root, _, s2 = pipeline
    assert f"step 2 starts from {root / 's1' / 'model_best.pth.tar'}" in s2.stdout
    best1 = read_checkpoint(root / "s1" / "model_best.pth.tar")
    ckpt = read_checkpoint(root / "s2" / "checkpoint.pth.tar")
    assert ckpt["step"] == 2 and ckpt["args"]["weight_decay"] == 0.0
    # One epoch of one trains at lr 0 (the recipe's schedule): the weights are step 1's best.
    for k, v in best1["state_dict"].items():
        if k.endswith("weight") and v.ndim == 4:
            assert torch.equal(v, ckpt["state_dict"][k]), k
    record = records(root / "s2")[0]
    assert record["lr"] == 0.0 and "ff" in record and "saturation" in record


def test_evaluate(pipeline, tmp_path, no_torchcodec):
    root, _, _ = pipeline
    best = root / "s2" / "model_best.pth.tar"
    results = tmp_path / "results.jsonl"
    p = run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", best, "--data",
             root / "data", "--input-size", "32", "-j", "0", "--batch_size", "4",
             "--results-file", results], cwd=tmp_path, PYTHONPATH=no_torchcodec)
    acc = acc1_of(p.stdout)
    assert len(acc) == 1
    # Progress every --print-freq batches (10 by default) and at the last: 3 batches of 4.
    assert re.findall(r"^Test: \[(\d)/3\]\tTime .*\timg/s .*\tETA .*$", p.stdout, re.M) == ["0", "2"]
    record = records(root / "s2")[0]
    assert acc[0] == pytest.approx(record["val_top1"], abs=1e-3)
    row = json.loads(results.read_text())
    assert {"model", "step", "top1", "top5", "params", "ops", "images"} <= set(row)
    assert row["step"] == 2 and row["images"] == 9 and row["top1"] == pytest.approx(acc[0], abs=1e-3)
    assert row["params"] == sum(v.numel() for k, v in read_checkpoint(best)["state_dict"].items()
                                if "running" not in k and "num_batches" not in k)
    assert row["ops"] > 0


def test_evaluate_released_layout(pipeline, tmp_path, capsys):
    """A released-style file (DataParallel 'module.' keys, no 'step') is taken as step 2."""
    import evaluate
    root, _, _ = pipeline
    ckpt = read_checkpoint(root / "s2" / "model_best.pth.tar")
    released = tmp_path / "released.pth.tar"
    torch.save({"epoch": 1, "best_top1_acc": 0.0, "optimizer": {},
                "state_dict": {"module." + k: v for k, v in ckpt["state_dict"].items()}}, released)
    stats = evaluate.main(["--checkpoint", str(released), "--data", str(root / "data"), "--input-size", "32",
                           "-j", "0", "--batch_size", "9"])
    out = capsys.readouterr().out
    assert "adambnn-release checkpoint, step 2 (default for released checkpoints)" in out
    assert "=> classes: folder k in sorted order is class k (the checkpoint records no class names); 3 of its 3 " \
           "classes present, scored among all 3" in out
    record = records(root / "s2")[0]
    assert stats.top1 == pytest.approx(record["val_top1"]) and stats.count == 9


@needs_torchcodec
def test_evaluate_bf16_channels_last_torch_backend(pipeline):
    import evaluate
    root, _, _ = pipeline
    stats = evaluate.main(["--checkpoint", str(root / "s2" / "model_best.pth.tar"), "--data", str(root / "data"),
                           "-j", "0", "--precision", "bf16", "--channels-last", "--data-backend", "torch"])
    assert stats.count == 9 and 0 <= stats.top1 <= 100


def test_export_and_evaluate_the_packed_file(pipeline, tmp_path, no_torchcodec):
    root, _, _ = pipeline
    packed = tmp_path / "packed.pt"
    run([sys.executable, "-m", "utils.export", "--checkpoint", root / "s2" / "model_best.pth.tar", "--out", packed],
        PYTHONPATH=no_torchcodec)
    p = run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", packed, "--data", root / "data",
             "-j", "0"], PYTHONPATH=no_torchcodec)
    assert "packed 1-bit checkpoint, step 2" in p.stdout and "; 9 images" in p.stdout
    # The float network's accuracy; float32 rounding may decide one image's class otherwise.
    assert acc1_of(p.stdout) == pytest.approx([records(root / "s2")[0]["val_top1"]], abs=100 / 9 + 1e-3)


def test_relaunch_after_the_end_does_nothing(pipeline, monkeypatch, capsys):
    from utils import train
    root, _, _ = pipeline
    monkeypatch.chdir(root)
    train.main(["--step", "1", "--data", "data", "--save", "s1", "--epochs", "2", "--batch_size", "4",
                "-j", "0", "--input-size", "32", "--teacher-weights", "teacher.pth"])
    assert "nothing to do: 2 epochs already done" in capsys.readouterr().out
    assert len(open(root / "s1" / "log.jsonl").readlines()) == 2
