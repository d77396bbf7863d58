"""Days-long runs survive faults and mistakes: relaunches with changed flags, NaN, unreadable
images, stop signals (mid-epoch save and exact continuation), errors on any rank, bad flags found
before anything is loaded. Tiny CPU runs through the real entry points."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

import evaluate
from tests.test_resume import assert_same_run, process_tree
from tests.tiny import ROOT, env, make_image_folder, make_teacher, run, step
from utils import checkpoint, cli, recipe, train
from utils.checkpoint import read_checkpoint
from utils.distributed import DistInfo
from utils.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED

LR = recipe.LEARNING_RATE["adam"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """2 classes; 24 train images (6 iterations of 4), 4 val images."""
    root = tmp_path_factory.mktemp("faults")
    data = make_image_folder(root / "data", classes=2, train_per_class=12, val_per_class=2)
    teacher = make_teacher(root / "teacher.pth", num_classes=2)
    return root, data, teacher


def records(save):
    return [json.loads(x) for x in open(os.path.join(save, "log.jsonl"))]


def test_extending_a_finished_run_follows_the_new_schedule(tiny):
    root, data, teacher = tiny
    save = root / "extend"
    step(1, data, save, "--epochs", "2", "--teacher-weights", teacher)
    p = step(1, data, save, "--epochs", "4", "--learning_rate", str(2 * LR), "--teacher-weights", teacher)
    resumed = next(line for line in p.stdout.splitlines() if "resuming from" in line)
    assert "changed, applied from now on:" in resumed and "--epochs 2 -> 4" in resumed
    assert f"--learning_rate {LR} -> {2 * LR}" in resumed
    # Epochs 2 and 3 train at the rate the new flags give them: 2 * lr * (1 - (e + 1) / 4).
    assert [r["lr"] for r in records(save)] == pytest.approx([LR / 2, 0.0, 2 * LR / 4, 0.0])
    assert all(r["val_loss"] < 10 for r in records(save))
    p = step(1, data, save, "--epochs", "4", "--teacher-weights", teacher)
    assert "nothing to do: 4 epochs already done" in p.stdout


def test_relaunch_refuses_a_changed_optimizer(tiny):
    root, data, teacher = tiny
    save = root / "extend"  # finished above with adam
    p = step(1, data, save, "--epochs", "6", "--optimizer", "sgd", "--teacher-weights", teacher, check=False)
    assert p.returncode == 1 and "was trained with --optimizer adam, not sgd" in p.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    root, data, teacher = tiny
    save = tmp_path / "nan"
    step(1, data, save, "--epochs", "3", "--stop-after-epochs", "1", "--teacher-weights", teacher)
    before = {f: open(save / f, "rb").read() for f in ("checkpoint.pth.tar", "model_best.pth.tar")}
    p = step(1, data, save, "--epochs", "3", "--learning_rate", "1e6", "--teacher-weights", teacher,
             check=False)
    assert p.returncode == 1, p.stdout[-2000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "not finite" in err[0] and "in epoch 1" in err[0], p.stderr
    assert all(open(save / f, "rb").read() == b for f, b in before.items())
    assert "not finite" in open(save / "log.txt").read()
    # evaluate.py refuses weights that are not finite.
    ckpt = read_checkpoint(save / "checkpoint.pth.tar")
    ckpt["state_dict"]["fc.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "diverged.pth.tar")
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(tmp_path / "diverged.pth.tar"), "--data", data, "-j", "0"])
    assert "non-finite values" in capsys.readouterr().err


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def test_unreadable_training_image_is_named_or_skipped(tiny, tmp_path):
    root, data, teacher = tiny
    bad_data = tmp_path / "data"
    shutil.copytree(data, bad_data)
    bad = bad_data / "train" / "class1" / "3.png"
    truncate(bad)
    p = step(1, bad_data, tmp_path / "stop", "--teacher-weights", teacher, check=False)
    assert p.returncode == 1 and str(bad) in p.stderr and "--skip-bad-images" in p.stderr
    assert "Traceback" not in p.stderr and str(bad) in open(tmp_path / "stop" / "log.txt").read()
    p = step(1, bad_data, tmp_path / "skip", "--teacher-weights", teacher, "--skip-bad-images", "1")
    assert f"skipped unreadable training image {bad}" in p.stdout
    assert records(tmp_path / "skip")[0]["val_images"] == 4


def test_unreadable_validation_image_keeps_the_trained_epoch(tiny, tmp_path):
    root, data, teacher = tiny
    bad_data = tmp_path / "data"
    shutil.copytree(data, bad_data)
    bad = bad_data / "val" / "class0" / "1.png"
    bad.write_bytes(os.urandom(300))
    p = step(1, bad_data, tmp_path / "save", "--teacher-weights", teacher, check=False)
    assert p.returncode == 1 and str(bad) in p.stderr and "epoch 0 was trained and saved" in p.stderr
    assert read_checkpoint(tmp_path / "save" / "checkpoint.pth.tar")["epoch"] == 1


def launch(data, save, teacher, *flags):
    tiny_flags = ["--data", data, "--save", save, "--batch_size", "4", "-j", "0", "--input-size", "32",
                  "--print-freq", "1", "--epochs", "2", "--teacher-weights", teacher, "--deterministic"]
    return subprocess.Popen(["bash", os.path.join(ROOT, "step1", "run.sh"), *map(str, tiny_flags), *flags],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    root, data, teacher = tiny
    proc = launch(data, root / "full", teacher)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return root / "full"


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, EXIT_PREEMPTED), (signal.SIGINT, EXIT_INTERRUPTED)])
def test_stop_signal_saves_mid_epoch_and_relaunch_equals_uninterrupted(tiny, uninterrupted, tmp_path, sig, code):
    root, data, teacher = tiny
    save = tmp_path / "stopped"
    proc = launch(data, save, teacher)
    wait_for_line(proc, "Epoch: [0][1/6]")
    proc.send_signal(sig)  # to the launcher, which passes it on
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert err.strip().count("\n") == 0 and f"stopped by {sig.name} in epoch 0" in err, err
    ckpt = read_checkpoint(save / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 0 and 2 <= ckpt["iteration"] < 6
    (save / "checkpoint.pth.tar.999999.tmp").write_bytes(b"left by a killed save")
    proc = launch(data, save, teacher)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"0 epochs and {ckpt['iteration']} iterations of epoch 0 done" in out
    assert "removed checkpoint.pth.tar.999999.tmp" in out and not (save / "checkpoint.pth.tar.999999.tmp").exists()
    assert_same_run(uninterrupted, save)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the worker")
def test_killing_the_launcher_stops_the_worker_cleanly(tiny, tmp_path):
    root, data, teacher = tiny
    save = tmp_path / "orphan"
    proc = launch(data, save, teacher)
    wait_for_line(proc, "Epoch: [0][1/6]")
    workers = [pid for pid in process_tree(proc.pid) if pid != proc.pid]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 120
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") and
                                         open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in workers):
        time.sleep(0.1)
    ckpt = read_checkpoint(save / "checkpoint.pth.tar")  # saved on the SIGTERM the kernel sent
    assert ckpt["epoch"] == 0 and 2 <= ckpt["iteration"] < 6


def test_flags_checked_before_anything_is_loaded(tmp_path, capsys):
    nowhere = str(tmp_path / "no_data")  # the flag's message comes first: the data is not looked at
    a_file = tmp_path / "file"
    a_file.write_text("")
    for flags, message in [(["--input-size", "40"], "--input-size 40 is not a multiple of 32"),
                           (["--learning_rate", "-1"], "--learning_rate -1.0 must be a number, not negative"),
                           (["--save", str(a_file / "sub")], f"{a_file} is not a folder"),
                           (["--skip-bad-images", "-1"], "--skip-bad-images must be at least 0, got -1")]:
        with pytest.raises(SystemExit):
            train.main(["--step", "1", "--data", nowhere, "--save", str(tmp_path / "s"), *flags])
        err = capsys.readouterr().err.strip()
        assert err == f"error: {err.removeprefix('error: ')}" and message in err, err
    assert not (tmp_path / "s").exists()


def test_lr_zero_and_one_epoch_are_said(tiny, tmp_path):
    root, data, teacher = tiny
    p = step(1, data, tmp_path / "s", "--teacher-weights", teacher, "--learning_rate", "0",
             "--stop-after-epochs", "1", "--epochs", "1")
    assert "warning: --learning_rate 0" in p.stdout and "warning: --epochs 1" in p.stdout


def test_errors_of_any_rank_are_printed_with_the_rank_and_logged(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    (tmp_path / "save").mkdir()
    cli.report("error: process 1 on this node has no GPU", str(tmp_path / "save"))
    assert capsys.readouterr().err == "[rank 1/2] error: process 1 on this node has no GPU\n"
    assert "[rank 1/2] error" in (tmp_path / "save" / "log.txt").read_text()


def test_ranks_that_see_different_checkpoints_stop(tmp_path, monkeypatch):
    save = tmp_path / "save"
    save.mkdir()
    torch.save({"epoch": 3, "step": 1, "state_dict": {}}, save / "checkpoint.pth.tar")
    monkeypatch.setattr(checkpoint, "all_gather_object", lambda view: [view, None])  # rank 1 sees no file
    saver = checkpoint.CheckpointSaver(str(save), DistInfo(), print)
    with pytest.raises(checkpoint.RunFolderError, match="must be a folder on a filesystem that every node shares"):
        saver.read_resume(1)
    saver.close()


def test_help_through_run_sh_shows_the_steps_defaults():
    p = run(["bash", os.path.join(ROOT, "step1", "run.sh"), "--help"])
    assert "AdamBNN step 1" in p.stdout and "--step" not in p.stdout
    assert "(default: None)" not in p.stdout and p.stdout.count("(default:") == p.stdout.count("default:")
    assert "5e-06" in p.stdout and "step1/output" in p.stdout
    p = run(["bash", os.path.join(ROOT, "step2", "run.sh"), "--help"])
    assert "--init-checkpoint" in p.stdout and "model_best.pth.tar" in p.stdout


def test_class_folder_mismatch_names_the_folders(tiny, tmp_path):
    root, data, teacher = tiny
    odd = tmp_path / "data"
    shutil.copytree(data, odd)
    os.rename(odd / "val" / "class1", odd / "val" / "other")
    p = step(1, odd, tmp_path / "s", "--teacher-weights", teacher, check=False)
    assert p.returncode == 1 and "only in train/: ['class1']" in p.stderr and "only in val/: ['other']" in p.stderr


def test_default_workers_use_the_cpus_this_process_may_run_on(monkeypatch):
    from utils import data
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert data.default_workers(1) == 3 and data.default_workers(2) == 1


def test_evaluate_uses_the_checkpoints_input_size(uninterrupted, capsys):
    root = uninterrupted.parent
    stats = evaluate.main(["--checkpoint", str(uninterrupted / "model_best.pth.tar"), "--data",
                           str(root / "data"), "-j", "0"])
    assert "input size 32 (from the checkpoint)" in capsys.readouterr().out
    assert stats.top1 == pytest.approx(max(r["val_top1"] for r in records(uninterrupted)))
