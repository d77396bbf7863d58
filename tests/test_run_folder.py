"""A run's folder: checkpoint.pth.tar and model_best.pth.tar written atomically and only with what
weights_only reads back; one run per folder, until its process dies. (Resuming, changed flags and
a full disk, through the entry points: tests/test_faults.py and tests/test_resume.py.)"""
import argparse
import os
import re
import shutil
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from utils.checkpoint import checkpoint_step, read_checkpoint
from utils.distributed import DistInfo
from utils.errors import FolderInUse, RunFolderError
from utils.run_folder import CheckpointSaver, save_checkpoint


def test_save_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1 - e / 10)
    state = {"epoch": 1, "step": 2, "arch": "reactnet_a", "state_dict": model.state_dict(), "best_top1_acc": 1.5,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "args": {"lr": 1e-3, "data": "/data", "resume": None}, "rng": {"torch": torch.get_rng_state()},
             "git_commit": "abc"}
    save_checkpoint(state, tmp_path / "out", is_best=False)
    assert os.listdir(tmp_path / "out") == ["checkpoint.pth.tar"]
    save_checkpoint(state, tmp_path / "out", is_best=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint.pth.tar", "model_best.pth.tar"]
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        loaded = read_checkpoint(tmp_path / "out" / name)
        assert checkpoint_step(loaded) == 2
        assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    # model_best.pth.tar is a file of its own: writing into checkpoint.pth.tar (as cp does when a
    # backup is copied over it) leaves it alone, and so does a later, not-best save.
    with open(tmp_path / "out" / "checkpoint.pth.tar", "r+b") as f:
        f.write(b"backup")
    assert read_checkpoint(tmp_path / "out" / "model_best.pth.tar")["epoch"] == 1
    save_checkpoint({**state, "epoch": 2}, tmp_path / "out", is_best=False)
    assert read_checkpoint(tmp_path / "out" / "checkpoint.pth.tar")["epoch"] == 2
    assert read_checkpoint(tmp_path / "out" / "model_best.pth.tar")["epoch"] == 1


def test_the_first_epoch_needs_room_for_checkpoint_and_model_best(tmp_path, monkeypatch):
    student = torch.nn.Linear(3, 2)
    checkpoint = sum(t.numel() * 4 for t in student.state_dict().values()) * 3  # weights, Adam's two states
    saver = CheckpointSaver(str(tmp_path / "save"), DistInfo(), print)
    try:
        monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=2 * checkpoint - 1))
        with pytest.raises(RunFolderError, match="stopped before training an epoch that could not be saved"):
            saver.check_space(student, "adam")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=2 * checkpoint))
        saver.check_space(student, "adam")
    finally:
        saver.close()


@pytest.mark.parametrize("bad,where", [
    ({"args": argparse.Namespace(lr=1)}, "state['args'] is a argparse.Namespace"),
    ({"best_top1_acc": np.float64(70.5)}, "state['best_top1_acc'] is a numpy.float64"),
])
def test_save_checkpoint_refuses_what_weights_only_cannot_read(tmp_path, bad, where):
    with pytest.raises(TypeError, match=where.replace("[", r"\[").replace("]", r"\]")):
        save_checkpoint({"step": 1, **bad}, tmp_path, is_best=False)
    assert os.listdir(tmp_path) == []


def test_one_run_per_folder_until_its_process_dies(tmp_path):
    folder = tmp_path / "save"
    stale = folder / "checkpoint.pth.tar.7.tmp"
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # a running run: holds the folder until it is killed
        try:
            CheckpointSaver(str(folder), DistInfo(), print)
            os.write(tell, b"x")
            time.sleep(600)
        finally:
            os._exit(0)
    os.close(tell)  # the child's end: a child that fails ends the read below
    try:
        assert os.read(ready, 1) == b"x"
        stale.write_bytes(b"a save under way")
        with pytest.raises(FolderInUse, match=re.escape(f"--save {folder} is in use by another run (pid {pid} on ")):
            CheckpointSaver(str(folder), DistInfo(), print)
        assert stale.exists()  # the running run's: left alone
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready)
    said = []
    saver = CheckpointSaver(str(folder), DistInfo(), said.append)  # the kernel released the lock
    assert said == ["=> removed checkpoint.pth.tar.7.tmp, left by a save that was killed"]
    saver.close()
    assert os.listdir(folder) == []
