"""Resume: a run interrupted after an epoch and relaunched with the same command ends with exactly
the weights, optimizer state and logs of a run never interrupted (same seed, CPU, --deterministic)."""
import contextlib
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.tiny import ROOT, env, records, step

EPOCHS = "2"  # epoch 0 trains at lr / 2, epoch 1 at 0 (its Adam moments and BN statistics still move)


@pytest.fixture(scope="module")
def setup(tiny_run):
    tiny = tiny_run(classes=2, train_per_class=4, val_per_class=2)
    root, data = tiny.root, tiny.data
    flags = ["--epochs", EPOCHS, "--teacher-weights", tiny.teacher, "--deterministic"]
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
    assert ca["best_top1_acc"] == cb["best_top1_acc"]
    la, lb = records(a), records(b)
    keys = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_images")
    assert [[r[k] for k in keys] for r in la] == [[r[k] for k in keys] for r in lb]


def test_stop_and_relaunch_equals_uninterrupted(setup):
    root, data, flags = setup
    p = step(1, data, root / "stopped", *flags, "--stop-after-epochs", "1")
    assert "stopped after epoch 1 of 2" in p.stdout
    assert len(open(root / "stopped" / "log.jsonl").readlines()) == 1
    p = step(1, data, root / "stopped", *flags)  # the same command again
    assert "resuming from" in p.stdout and "1 epochs done" in p.stdout
    assert_same_run(root / "full", root / "stopped")


def process_tree(pid):
    """pid and all its descendants (torchrun starts its workers in their own sessions)."""
    children = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(proc):
    """A launch a test leaves behind: SIGKILL to it and its descendants, if it still runs."""
    if proc.poll() is None:
        for pid in process_tree(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the worker processes")
def test_kill_9_and_relaunch_equals_uninterrupted(setup):
    root, data, flags = setup
    save = root / "killed"
    tiny = ["--data", data, "--save", save, "--batch_size", "4", "-j", "0", "--input-size", "32"]
    cmd = ["bash", os.path.join(ROOT, "step1", "run.sh"), *map(str, tiny), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (save / "checkpoint.pth.tar").exists():  # epoch 0 is saved (atomically)
            break
        time.sleep(0.05)
    for pid in reversed(process_tree(proc.pid)):  # the worker, then the launcher
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    done = torch.load(save / "checkpoint.pth.tar", weights_only=True)["epoch"]
    if done >= int(EPOCHS):
        pytest.skip("the run finished before it could be killed")
    p = step(1, data, save, *flags)
    assert "resuming from" in p.stdout
    assert_same_run(root / "full", save)
