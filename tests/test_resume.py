"""Resume: a run interrupted after an epoch and relaunched with the same command ends with exactly
the weights, optimizer state and logs of a run never interrupted (same seed, CPU, --deterministic)."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.tiny import ROOT, env, make_image_folder, make_teacher, step

EPOCHS = "3"  # epoch 0 trains at 2/3 lr, epoch 1 at 1/3, epoch 2 at 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_image_folder(root / "data", classes=2, train_per_class=4, val_per_class=2)
    teacher = make_teacher(root / "teacher.pth", num_classes=2)
    flags = ["--epochs", EPOCHS, "--teacher-weights", teacher, "--deterministic"]
    step(1, data, root / "full", *flags)
    return root, data, flags


def assert_same_run(a, b):
    ca = torch.load(os.path.join(a, "checkpoint.pth.tar"), weights_only=True)
    cb = torch.load(os.path.join(b, "checkpoint.pth.tar"), weights_only=True)
    assert ca["epoch"] == cb["epoch"] == int(EPOCHS)
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"]
    assert ca["scheduler"] == cb["scheduler"] and ca["best_top1_acc"] == cb["best_top1_acc"]
    la = [json.loads(x) for x in open(os.path.join(a, "log.jsonl"))]
    lb = [json.loads(x) for x in open(os.path.join(b, "log.jsonl"))]
    keys = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_images")
    assert [[r[k] for k in keys] for r in la] == [[r[k] for k in keys] for r in lb]


def test_stop_and_relaunch_equals_uninterrupted(setup):
    root, data, flags = setup
    p = step(1, data, root / "stopped", *flags, "--stop-after-epochs", "1")
    assert "stopped after epoch 1 of 3" in p.stdout
    assert len(open(root / "stopped" / "log.jsonl").readlines()) == 1
    p = step(1, data, root / "stopped", *flags)  # the same command again
    assert "resuming from" in p.stdout and "1 epochs done" in p.stdout
    assert_same_run(root / "full", root / "stopped")


def test_kill_9_and_relaunch_equals_uninterrupted(setup):
    root, data, flags = setup
    save = root / "killed"
    tiny = ["--data", data, "--save", save, "--batch_size", "4", "-j", "0", "--input-size", "32"]
    cmd = ["bash", os.path.join(ROOT, "step1", "run.sh"), *map(str, tiny), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log = save / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 1:  # epoch 1's checkpoint is saved
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, the worker, everything
    proc.wait()
    done = len(log.read_text().splitlines())
    if done >= int(EPOCHS):
        pytest.skip("the run finished before it could be killed")
    p = step(1, data, save, *flags)
    assert "resuming from" in p.stdout
    assert_same_run(root / "full", save)
