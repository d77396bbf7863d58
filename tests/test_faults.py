"""Days-long runs survive faults and mistakes: relaunches with changed flags, NaN, unreadable
images, stop signals (mid-epoch save and exact continuation), errors on any rank, bad flags found
before anything is loaded. Tiny CPU runs through the real entry points."""
import errno
import json
import multiprocessing
import os
import pty
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import evaluate
from tests.test_resume import assert_same_run, kill_tree, process_tree
from tests.tiny import (ROOT, env, free_port, make_image_folder, needs_torchcodec, records, run, step, train_here,
                        wait_for_line)
from utils import cli, config, preempt, recipe, run_folder, train
from utils.checkpoint import read_checkpoint
from utils.data import image_folder
from utils.distributed import DistInfo
from utils.errors import RunFolderError
from utils.loaders import build_loader
from utils.logger import RunLogger
from utils.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED, STOP_SIGNALS

LR = recipe.LEARNING_RATE["adam"]


@pytest.fixture(scope="module")
def tiny(tiny_run):
    """2 classes; 24 train images (6 iterations of 4), 4 val images; a step-1 checkpoint."""
    return tiny_run(classes=2, train_per_class=12, val_per_class=2, step1=True)


def test_extending_a_finished_run_follows_the_new_schedule(tiny):
    root, data, teacher = tiny.root, tiny.data, tiny.teacher
    save = root / "extend"
    train_here(1, data, save, "--epochs", "2", "--teacher-weights", teacher)
    p = train_here(1, data, save, "--epochs", "4", "--learning_rate", str(2 * LR), "--teacher-weights", teacher,
                   "--print_freq", "2")
    resumed = next(line for line in p.stdout.splitlines() if "resuming from" in line)
    assert "changed, applied from now on:" in resumed and "--epochs 2 -> 4" in resumed
    assert f"--learning_rate {LR} -> {2 * LR}" in resumed and "--print-freq 1 -> 2" in resumed  # as --help spells it
    # Epochs 2 and 3 train at the rate the new flags give them: 2 * lr * (1 - (e + 1) / 4).
    assert [r["lr"] for r in records(save)] == pytest.approx([LR / 2, 0.0, 2 * LR / 4, 0.0])
    assert all(r["val_loss"] < 10 for r in records(save))
    p = train_here(1, data, save, "--epochs", "4", "--teacher-weights", teacher)
    assert "nothing to do: 4 epochs already done" in p.stdout


def test_relaunch_refuses_a_changed_optimizer(tiny):
    root, data, teacher = tiny.root, tiny.data, tiny.teacher
    save = root / "extend"  # finished above with adam
    p = train_here(1, data, save, "--epochs", "6", "--optimizer", "sgd", "--teacher-weights", teacher, check=False)
    assert p.returncode == 1 and "was trained with --optimizer adam, not sgd" in p.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    data, teacher = tiny.data, tiny.teacher
    save = tmp_path / "nan"
    train_here(1, data, save, "--epochs", "3", "--stop-after-epochs", "1", "--teacher-weights", teacher)
    before = {f: open(save / f, "rb").read() for f in ("checkpoint.pth.tar", "model_best.pth.tar")}
    p = train_here(1, data, save, "--epochs", "3", "--learning_rate", "1e6", "--teacher-weights", teacher,
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
    data, teacher = tiny.data, tiny.teacher
    bad_data = tmp_path / "data"
    shutil.copytree(data, bad_data)
    bad = bad_data / "train" / "class1" / "3.png"
    truncate(bad)
    p = train_here(1, bad_data, tmp_path / "stop", "--teacher-weights", teacher, check=False)
    assert p.returncode == 1 and str(bad) in p.stderr and "--skip-bad-images" in p.stderr
    assert "Traceback" not in p.stderr and str(bad) in open(tmp_path / "stop" / "log.txt").read()
    p = train_here(1, bad_data, tmp_path / "skip", "--teacher-weights", teacher, "--skip-bad-images", "1")
    assert f"skipped unreadable training image {bad}" in p.stdout
    assert records(tmp_path / "skip")[0]["val_images"] == 4


def test_unreadable_validation_image_keeps_the_trained_epoch(tiny, tmp_path, capsys):
    data, teacher = tiny.data, tiny.teacher
    bad_data = tmp_path / "data"
    shutil.copytree(data, bad_data)
    bad = bad_data / "val" / "class0" / "1.png"
    bad.write_bytes(os.urandom(300))
    p = step(1, bad_data, tmp_path / "save", "--teacher-weights", teacher, check=False)
    assert p.returncode == 1 and str(bad) in p.stderr and "epoch 0 was trained and saved" in p.stderr
    assert read_checkpoint(tmp_path / "save" / "checkpoint.pth.tar")["epoch"] == 1
    flags = tiny_args(bad_data, tmp_path / "save", teacher, "--epochs", "1")
    assert str(bad) in exit_error(flags, capsys)  # validated again, not trained again
    shutil.copy(data + "/val/class0/1.png", bad)
    train.main(flags)
    out = capsys.readouterr().out
    assert "1 epochs done, best val Acc@1 none yet; epoch 0 is trained but not validated: validating it first" in out
    assert "Epoch: [" not in out and [r["epoch"] for r in records(tmp_path / "save")] == [0]


def launch_command(data, save, teacher, *flags) -> list:
    tiny_flags = ["--data", data, "--save", save, "--batch_size", "4", "-j", "0", "--input-size", "32",
                  "--print-freq", "1", "--epochs", "2", "--teacher-weights", teacher, "--deterministic"]
    return ["bash", os.path.join(ROOT, "step1", "run.sh"), *map(str, tiny_flags), *map(str, flags)]


def launch(data, save, teacher, *flags, **extra_env):
    return subprocess.Popen(launch_command(data, save, teacher, *flags), cwd=ROOT, env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    root, data, teacher = tiny.root, tiny.data, tiny.teacher
    proc = launch(data, root / "full", teacher)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return root / "full"


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, EXIT_PREEMPTED), (signal.SIGINT, EXIT_INTERRUPTED)])
def test_stop_signal_saves_mid_epoch_and_relaunch_equals_uninterrupted(tiny, uninterrupted, tmp_path, sig, code):
    data, teacher = tiny.data, tiny.teacher
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
    data, teacher = tiny.data, tiny.teacher
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


def signal_every_process(proc, sig=signal.SIGTERM) -> list:
    """Send `sig` to the launcher and all its descendants at once, as SLURM's scancel and preemption
    do; returns their pids."""
    tree = process_tree(proc.pid)
    for pid in tree:
        os.kill(pid, sig)
    return tree


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the processes")
@pytest.mark.parametrize("nproc, workers, backend",
                         [(2, 2, "pil"), pytest.param(1, 0, "torch", marks=needs_torchcodec)])
def test_sigterm_to_every_process_saves_mid_epoch_and_relaunch_finishes(tiny, tmp_path, nproc, workers, backend):
    data, teacher = tiny.data, tiny.teacher
    save, tmp = tmp_path / "save", tmp_path / "tmp"
    tmp.mkdir()
    flags = ("--epochs", 1, "-j", workers, "--data-backend", backend)
    proc = launch(data, save, teacher, *flags, NPROC_PER_NODE=str(nproc), TMPDIR=str(tmp))
    wait_for_line(proc, "Epoch: [0][1/6]")
    signalled = signal_every_process(proc)
    assert len(signalled) == 1 + nproc * (1 + workers)  # the launcher, the trainers, their loader workers
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert err.strip().count("\n") == 0 and "stopped by SIGTERM in epoch 0 after iteration" in err, err
    ckpt = read_checkpoint(save / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 0 and 2 <= ckpt["iteration"] < 6
    proc = launch(data, save, teacher, *flags, NPROC_PER_NODE=str(nproc), TMPDIR=str(tmp))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"0 epochs and {ckpt['iteration']} iterations of epoch 0 done" in out
    assert read_checkpoint(save / "checkpoint.pth.tar")["epoch"] == 1 and [r["epoch"] for r in records(save)] == [0]
    assert not [f for f in os.listdir(tmp) if f.startswith(("torchelastic_", "adambnn_torchrun_"))]
    assert "nvjpeg" not in out  # on a CPU nothing is nvjpeg's to decode


def assert_saved_mid_epoch(save):
    ckpt = read_checkpoint(save / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 0 and 2 <= ckpt["iteration"] < 6


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the processes")
@pytest.mark.parametrize("to", ["the launcher", "every process"])
def test_sighup_saves_mid_epoch_and_exits_75(tiny, tmp_path, to):
    # As SIGTERM does (the relaunch is the same: tested above); to every process, loader workers included.
    data, teacher = tiny.data, tiny.teacher
    save = tmp_path / "save"
    proc = launch(data, save, teacher, "--epochs", 1, "-j", 2)
    wait_for_line(proc, "Epoch: [0][1/6]")
    if to == "the launcher":
        proc.send_signal(signal.SIGHUP)
    else:
        assert len(signal_every_process(proc, signal.SIGHUP)) == 4  # the launcher, the trainer, 2 loader workers
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert err.strip().count("\n") == 0 and "stopped by SIGHUP in epoch 0 after iteration" in err, err
    assert_saved_mid_epoch(save)


# What a terminal (an SSH session, a terminal window) does for the command it runs: a session of
# its own with the terminal as its controlling terminal, on the standard streams.
IN_A_TERMINAL = "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); " \
                "os.execvp(sys.argv[1], sys.argv[1:])"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the processes")
def test_a_closed_terminal_saves_mid_epoch_and_exits_75(tiny, tmp_path):
    # Closing the terminal sends SIGHUP to the launcher's process group, and from then on every
    # write to the terminal fails (EIO), the training processes' too: they must still save.
    data, teacher = tiny.data, tiny.teacher
    save = tmp_path / "save"
    terminal, tty = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", IN_A_TERMINAL, *launch_command(data, save, teacher, "--epochs", 1)],
                            cwd=ROOT, env=env(), stdin=tty, stdout=tty, stderr=tty)
    os.close(tty)
    seen, deadline = b"", time.time() + 300
    while b"Epoch: [0][1/6]" not in seen and time.time() < deadline and proc.poll() is None:
        if select.select([terminal], [], [], 0.5)[0]:
            seen += os.read(terminal, 65536)
    assert b"Epoch: [0][1/6]" in seen, seen.decode()[-2000:]
    os.close(terminal)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED
    assert_saved_mid_epoch(save)
    last = (save / "log.txt").read_text().splitlines()[-1]  # the terminal is gone: log.txt says it
    assert last.startswith("=> stopped by SIGHUP in epoch 0 after iteration") and "relaunch the same command" in last


@pytest.mark.parametrize("backend", ["pil", pytest.param("torch", marks=needs_torchcodec)])
def test_loader_workers_ignore_stop_signals(tiny, backend):
    data = tiny.data
    for split, batch_size in (("train", 4), ("val", 1)):
        loader = build_loader(split, backend, data, batch_size, DistInfo(), workers=2, input_size=32)[0]
        batches = iter(loader)
        next(batches), next(batches)  # one from each worker: both are past their start-up
        for worker in multiprocessing.active_children():
            for sig in STOP_SIGNALS:
                os.kill(worker.pid, sig)
        assert len(list(batches)) == len(loader) - 2
        del batches, loader


@pytest.fixture(scope="module")
def small(tiny):
    """The `tiny` classes with one iteration of 4 training images and 2 validation images."""
    root = tiny.root
    return make_image_folder(root / "small", classes=2, train_per_class=2, val_per_class=1)


# Put first on PYTHONPATH, this makes each training process of a launch wait after its first call
# of GATE_AT (module.function) until the file GATE exists, creating GATE.<rank> when it arrives.
GATE = """
import os
import time
if "LOCAL_RANK" in os.environ and "GATE" in os.environ:  # a training process, not the launcher
    import importlib
    module_name, _, name = os.environ["GATE_AT"].rpartition(".")
    module = importlib.import_module(module_name)
    real = getattr(module, name)

    def gated(*args, **kwargs):
        result = real(*args, **kwargs)
        arrived = os.environ["GATE"] + "." + os.environ["RANK"]
        if not os.path.exists(arrived):
            open(arrived, "w").close()
            while not os.path.exists(os.environ["GATE"]):
                time.sleep(0.01)
        return result

    setattr(module, name, gated)
"""


@pytest.fixture
def gated_launch(tmp_path):
    """`start(data, save, teacher, at, nproc)`: a launch whose training processes wait after their
    first call of `at` until the returned gate file exists. What still runs after the test is killed."""
    hook, gate, started = tmp_path / "hook", tmp_path / "gate", []
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GATE)

    def start(data, save, teacher, at, nproc=1, epochs=1):
        started.append(launch(data, save, teacher, "--epochs", epochs, NPROC_PER_NODE=str(nproc),
                              PYTHONPATH=str(hook), GATE=str(gate), GATE_AT=at))
        return started[-1], gate

    yield start
    for proc in started:
        kill_tree(proc)


def wait_for_file(proc, path, timeout=300):
    """Wait until `path` exists, while `proc` runs."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the processes")
def test_sigterm_during_start_up_exits_75_with_nothing_saved(tiny, small, tmp_path, gated_launch):
    teacher = tiny.teacher
    save = tmp_path / "save"
    proc, gate = gated_launch(small, save, teacher, "utils.distill.build_teacher", nproc=2)
    for rank in (0, 1):
        wait_for_file(proc, f"{gate}.{rank}")  # both processes have loaded the teacher
    signal_every_process(proc)
    gate.touch()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert err == "[rank 0/2] => stopped by SIGTERM during start-up: nothing to save yet; relaunch the same command\n"
    assert not save.exists()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the processes")
def test_a_second_launch_into_a_running_save_is_refused_even_during_its_save(tiny, small, tmp_path, gated_launch):
    teacher = tiny.teacher
    save = tmp_path / "save"
    first, gate = gated_launch(small, save, teacher, "torch.save")
    wait_for_file(first, f"{gate}.0")  # the first run is writing its checkpoint
    temporary = [f for f in os.listdir(save) if f.endswith(".tmp")]
    trainer = [pid for pid in process_tree(first.pid) if pid != first.pid]
    assert len(temporary) == 1 and len(trainer) == 1
    second = launch(small, save, teacher, "--epochs", 1, NPROC_PER_NODE="2")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 1, err
    assert err.startswith(f"[rank 0/2] error: --save {save} is in use by another run (pid {trainer[0]} on ")
    assert err.count("\n") == 1, err
    assert [f for f in os.listdir(save) if f.endswith(".tmp")] == temporary  # not taken for a killed save's
    gate.touch()
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert "=> done" in out and "removed" not in out
    assert [r["epoch"] for r in records(save)] == [0] and read_checkpoint(save / "checkpoint.pth.tar")["epoch"] == 1
    assert "in use" not in (save / "log.txt").read_text()  # the refused launch wrote nothing there


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the processes")
def test_a_second_ctrl_c_stops_at_once_and_says_the_progress_since_the_checkpoint_is_lost(tiny, small, tmp_path,
                                                                                         gated_launch):
    teacher = tiny.teacher
    proc, gate = gated_launch(small, tmp_path / "save", teacher, "utils.engine.train_step")
    wait_for_file(proc, f"{gate}.0")  # training: its first iteration waits at the gate, which stays shut
    proc.send_signal(signal.SIGINT)
    time.sleep(1)  # two signals at once would be one: the launcher handles the first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err == ("=> stopped at once by a second SIGINT: the training processes were killed, so the progress since "
                   "the last checkpoint is lost; relaunch the same command to continue from that checkpoint\n")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the processes")
def test_a_stop_during_validation_saves_the_trained_epoch_and_a_relaunch_validates_it(tiny, uninterrupted, tmp_path,
                                                                                    gated_launch):
    data, teacher = tiny.data, tiny.teacher
    save = tmp_path / "save"
    # Validation's first batch (F.cross_entropy is validation's alone) waits at the gate.
    proc, gate = gated_launch(data, save, teacher, "torch.nn.functional.cross_entropy", epochs=2)
    wait_for_file(proc, f"{gate}.0")
    signal_every_process(proc)
    gate.touch()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert err == (f"=> stopped by SIGTERM while validating epoch 0 (trained; a relaunch validates it): saved "
                   f"{save / 'checkpoint.pth.tar'}; relaunch the same command to continue\n")
    assert "Epoch: [0][5/6]" in out and "* Acc@1" not in out  # trained, validation cut short
    ckpt = read_checkpoint(save / "checkpoint.pth.tar")
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["unvalidated"]["train"]["epoch"]) == (1, 0, 0)
    out, err = launch(data, save, teacher).communicate(timeout=600)  # the same command again
    assert "epoch 0 is trained but not validated: validating it first" in out, err
    assert "Epoch: [0]" not in out and "Epoch: [1][5/6]" in out
    assert_same_run(uninterrupted, save)


# A process that ends while its loader's workers are alive: a run ended by an error, whose
# traceback holds the loaders, and here a global.
EXIT_WITH_WORKERS = """
import sys, torch
from utils.data import ShardSampler, data_loader
ds = torch.utils.data.TensorDataset(torch.arange(16.0))
loader = data_loader(ds, ShardSampler(ds), 4, 2, False, collate_fn=torch.utils.data.default_collate)
next(iter(loader))
sys.exit(3)
"""


def test_a_process_ending_with_its_loader_workers_alive_does_not_wait_for_them():
    # The workers ignore stop signals; Python's exit sends them SIGTERM and would then wait forever.
    p = run([sys.executable, "-c", EXIT_WITH_WORKERS], check=False, timeout=60, PYTHONPATH=ROOT)
    assert p.returncode == 3, p.stderr


def tiny_args(data, save, teacher, *flags, step=1):
    """In-process training flags of the tiny runs."""
    return ["--step", str(step), "--data", str(data), "--save", str(save), "--batch_size", "4", "-j", "0",
            "--input-size", "32", "--print-freq", "1", "--teacher-weights", str(teacher), *map(str, flags)]


def exit_error(argv, capsys) -> str:
    """train.main's one error line (exit code 1)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def step2_run(tiny, small):
    """A finished one-epoch step-2 run on the small data, and the step-1 checkpoint it started from."""
    init, save = tiny.step1, tiny.root / "step2"
    train.main(tiny_args(small, save, tiny.teacher, "--epochs", "1", "--init-checkpoint", init, step=2))
    return save, init


def copy_run(save, to, *leave_out):
    """A copy of a run's folder (hard links: a run replaces its files, never writes into them)."""
    shutil.copytree(save, to, copy_function=os.link, ignore=shutil.ignore_patterns(*leave_out))
    return to


def test_a_save_with_a_run_but_no_checkpoint_is_refused_untouched(tiny, step2_run, tmp_path, capsys):
    teacher = tiny.teacher
    save = copy_run(step2_run[0], tmp_path / "save", "checkpoint.pth.tar")
    before = {f: (save / f).read_bytes() for f in ("model_best.pth.tar", "log.jsonl", "args.json")}
    nowhere = tmp_path / "no_data"  # said first: the data is not looked at
    err = exit_error(tiny_args(nowhere, save, teacher, "--epochs", "1", "--init-checkpoint", step2_run[1], step=2),
                     capsys)
    assert f"--save {save} holds a run (model_best.pth.tar, log.jsonl, args.json) but no checkpoint.pth.tar" in err
    assert "pass another --save, or move those files away" in err
    assert {f: (save / f).read_bytes() for f in before} == before


def test_model_best_is_a_file_of_its_own(step2_run):
    # Not a link to checkpoint.pth.tar: copying a backup over one (cp writes into the file) or
    # deleting it to free space must not touch the other.
    save = step2_run[0]
    best, ckpt = os.stat(save / "model_best.pth.tar"), os.stat(save / "checkpoint.pth.tar")
    assert best.st_ino != ckpt.st_ino and best.st_nlink == ckpt.st_nlink == 1


def test_a_damaged_log_line_is_set_aside_and_the_run_resumes(tiny, small, step2_run, tmp_path):
    teacher, init = tiny.teacher, step2_run[1]
    save = tmp_path / "save"
    shutil.copytree(step2_run[0], save)
    log = save / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"epoch": 1, "lr": 0.0, "train_lo')  # cut off by a crash mid-write
    p = train_here(2, small, save, "--epochs", 2, "--teacher-weights", teacher, "--init-checkpoint", init)
    said = [line for line in p.stdout.splitlines() if "damaged line" in line]
    assert said == [f"=> 1 damaged line(s) of {log} (cut off by a crash mid-write?) moved to {log}.damaged; the "
                    "other records are kept"]
    assert [r["epoch"] for r in records(save)] == [0, 1]
    assert (save / "log.jsonl.damaged").read_text() == '{"epoch": 1, "lr": 0.0, "train_lo\n'


NOT_UTF8 = os.fsdecode(b"bad\xff.png")  # a file name whose bytes are not UTF-8


@pytest.mark.parametrize("skip", [0, 1])
def test_an_unreadable_image_whose_name_is_not_utf8_is_named(tiny, small, tmp_path, skip):
    bad_data = tmp_path / "data"
    shutil.copytree(small, bad_data)
    bad = bad_data / "train" / "class1" / NOT_UTF8
    os.rename(bad_data / "train" / "class1" / "1.png", bad)
    bad.write_bytes(b"not an image")
    shown = str(bad).replace(NOT_UTF8, "bad\\xff.png")  # as bash's $'...' writes the byte
    save = tmp_path / "save"
    p = train_here(1, bad_data, save, "--teacher-weights", tiny.teacher, "--skip-bad-images", skip, check=False)
    log = (save / "log.txt").read_text()
    if skip:
        assert p.returncode == 0, p.stderr
        assert f"=> skipped unreadable training image {shown} (" in p.stdout and shown in log
    else:
        assert p.returncode == 1 and p.stderr.startswith(f"error: training image {shown} is unreadable"), p.stderr
        assert p.stderr.count("\n") == 1 and f"error: training image {shown}" in log


def test_init_checkpoint_may_name_step1s_folder(tiny, small, tmp_path, capsys):
    folder = tmp_path / "step1_output"
    folder.mkdir()
    argv = tiny_args(small, tmp_path / "save", tiny.teacher, "--epochs", 1, "--init-checkpoint", folder, step=2)
    assert exit_error(argv, capsys) == (f"error: --init-checkpoint {folder} is a folder without a model_best.pth.tar: "
                                        "pass the step-1 checkpoint file, step 1's --save folder's model_best.pth.tar")
    shutil.copy(tiny.step1, folder / "model_best.pth.tar")
    train.main(argv)
    out = capsys.readouterr().out
    assert f"=> --init-checkpoint {folder} is a folder: step 2 starts from its model_best.pth.tar" in out
    assert f"=> step 2 starts from {folder / 'model_best.pth.tar'} (this-repo" in out


def test_a_reactnet_checkpoint_as_teacher_weights_is_one_short_line(tiny, small, tmp_path, capsys):
    err = exit_error(tiny_args(small, tmp_path / "save", tiny.step1), capsys)
    assert err.startswith(f"error: {tiny.step1} does not fit torchvision resnet34 (missing keys: conv1.weight, ")
    assert "more)" in err and err.endswith("--teacher-weights takes the teacher's own weights, a resnet34 state_dict")
    assert len(err) < 1000


def test_args_json_holds_a_command_that_pastes_back_into_a_shell(tmp_path, monkeypatch):
    argv = ["utils/train.py", "--step", "1", "--data", str(tmp_path / "my data"), "--save", "it's here"]
    monkeypatch.setattr(sys, "argv", argv)
    RunLogger(str(tmp_path)).save_args({})  # what a run writes at its start
    assert shlex.split(json.loads((tmp_path / "args.json").read_text())["command"]) == argv


def test_step2_relaunch_says_a_new_init_checkpoint_is_not_read(tiny, small, step2_run, tmp_path, capsys):
    teacher = tiny.teacher
    save, init = step2_run
    other = tmp_path / "other.pth.tar"
    shutil.copy(init, other)
    capsys.readouterr()
    train.main(tiny_args(small, save, teacher, "--epochs", "1", "--init-checkpoint", other, step=2))
    out = capsys.readouterr().out
    assert f"--init-checkpoint {init} -> {other} is not read: step 2 continues from its own checkpoint" in out
    assert "applied from now on" not in out and "nothing to do: 1 epochs already done" in out


def test_relaunch_lists_a_changed_training_set(tiny, small, step2_run, tmp_path, capsys):
    teacher = tiny.teacher
    save, init = step2_run
    more = tmp_path / "data"
    shutil.copytree(small, more)
    for i in (2, 3):
        shutil.copy(more / "train" / "class0" / "0.png", more / "train" / "class0" / f"{i}.png")
    capsys.readouterr()
    train.main(tiny_args(more, save, teacher, "--epochs", "1", "--init-checkpoint", init, step=2))
    resumed = next(line for line in capsys.readouterr().out.splitlines() if "resuming from" in line)
    assert f"changed, applied from now on: --data {small} -> {more}, training images 4 -> 6" in resumed


def test_resume_with_another_class_count_names_the_file(tiny_run, step2_run, capsys):
    save, init = step2_run
    three = tiny_run(classes=3, train_per_class=1, val_per_class=1)
    err = exit_error(tiny_args(three.data, save, three.teacher, "--epochs", "1", "--init-checkpoint", init, step=2),
                     capsys)
    assert f"{save / 'checkpoint.pth.tar'} has 2 classes but the data has 3: resume with the data" in err


def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_stops_a_relaunch_before_training(
        tiny, small, step2_run, tmp_path, monkeypatch, capsys):
    teacher = tiny.teacher
    save = copy_run(step2_run[0], tmp_path / "save")
    flags = tiny_args(small, save, teacher, "--epochs", "2", "--init-checkpoint", step2_run[1], step=2)
    before = (save / "checkpoint.pth.tar").read_bytes()

    def disk_full(obj, f):
        f.write(b"part of a checkpoint")
        try:  # how torch.save reports it: a RuntimeError raised while handling the OSError
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")  # noqa: B904

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(cli, "append_line", lambda path, line: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    err = exit_error(flags, capsys)  # epoch 1 is trained, its checkpoint cannot be written
    assert err.startswith(f"error: no space left in {save} to write checkpoint.pth.tar (about ")
    assert "MB needed, " in err and "MB free)" in err
    assert (save / "checkpoint.pth.tar").read_bytes() == before  # epoch 0's, intact
    assert not [f for f in os.listdir(save) if f.endswith(".tmp")]

    size = os.path.getsize(save / "checkpoint.pth.tar")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=size // 2))
    with pytest.raises(SystemExit):
        train.main(flags)
    out, err = capsys.readouterr()
    assert err == (f"error: {save} has {size // 2 / 1e6:,.1f} MB free and a checkpoint needs about {size / 1e6:,.1f} "
                   "MB: free space there or pass another --save; stopped before training an epoch that could not be "
                   "saved\n")
    assert "resuming from" in out and "Epoch: [" not in out


def test_hidden_folders_and_files_are_neither_classes_nor_images(tiny, tmp_path):
    data = tiny.data
    odd = tmp_path / "data"
    shutil.copytree(data, odd)
    for split in ("train", "val"):
        (odd / split / ".ipynb_checkpoints").mkdir()
        shutil.copy(odd / split / "class0" / "0.png", odd / split / ".ipynb_checkpoints" / "0-checkpoint.png")
        shutil.copy(odd / split / "class0" / "0.png", odd / split / "class0" / "._0.png")  # macOS's
    for split, images in (("train", 24), ("val", 4)):
        folder = image_folder(str(odd), split, None)
        assert folder.classes == ["class0", "class1"] and len(folder) == images


@pytest.mark.parametrize("flags, message", [
    (["-j", "-1"], "-j/--workers must be at least 0, got -1"),
    (["--analysis-every", "-1"], "--analysis-every must be at least 0, got -1"),
    (["--seed", "99999999999999999999"], "--seed must be from 0 to 4294967295, got 99999999999999999999"),
    (["--print-freq", "0"], "--print-freq must be at least 1, got 0"),
    (["--input_size", "0"], "--input-size must be at least 32, got 0"),
    (["--batch-size", "0"], "--batch_size must be at least 1, got 0"),
    (["--stop-after-epochs", "-1"], "--stop-after-epochs must be at least 1, got -1"),
    (["--weight_decay", "nan"], "--weight_decay nan must be a number"),
    (["--batch_size", "1", "--input-size", "32"], "--batch_size 1 is one image per process: at --input-size 32"),
])
def test_flag_errors_come_first_in_one_line(tmp_path, capsys, flags, message):
    nowhere = tmp_path / "no_data"  # the flag's message comes first: the data is not looked at
    assert message in exit_error(["--step", "1", "--data", str(nowhere), "--save", str(tmp_path / "s"), *flags], capsys)


def entry_points() -> dict:
    """{name: (its parsers, including subcommands', and its main)} of every command-line entry point."""
    from utils import export, ops
    from utils.analysis import findings, landscape
    from utils.bench import __main__ as bench
    from utils.demo import digits
    found = {"train": ([config.get_parser(1), config.get_parser(2), config.get_parser()], train.main),
             "evaluate.py": ([evaluate.get_parser()], evaluate.main)}
    for name, module in (("utils.export", export), ("utils.ops", ops), ("utils.bench", bench),
                         ("utils.analysis.findings", findings), ("utils.analysis.landscape", landscape),
                         ("utils.demo.digits", digits)):
        parser = module.get_parser()
        subcommands = [a.choices.values() for a in parser._actions if isinstance(a.choices, dict)]
        found[name] = ([parser, *(p for ps in subcommands for p in ps)], module.main)
    return found


def test_every_long_flag_of_every_entry_point_takes_both_spellings():
    for name, (parsers, _) in entry_points().items():
        for parser in parsers:
            for action in parser._actions:
                flag = next((n for n in action.option_strings if n.startswith("--")), "--help")
                for spelling in (flag.replace("_", "-"), "--" + flag[2:].replace("-", "_")) if flag != "--help" else ():
                    assert parser._option_string_actions.get(spelling) is action, (name, spelling)
    args = config.parse_args(["--step", "1", "--batch-size", "8", "--print_freq", "3", "--data_backend", "torch"])
    assert (args.batch_size, args.print_freq, args.data_backend) == (8, 3, "torch")


def test_a_usage_error_exits_1_from_every_entry_point(capsys):
    for name, (_, main) in entry_points().items():
        with pytest.raises(SystemExit) as e:
            main(["--no-such-flag"])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("usage:") and "error: " in err, (name, err)
    p = run(["bash", os.path.join(ROOT, "step1", "run.sh"), "--no-such-flag"], check=False)
    assert p.returncode == 1 and "unrecognized arguments: --no-such-flag" in p.stderr, p.stderr


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
    data, teacher = tiny.data, tiny.teacher
    p = train_here(1, data, tmp_path / "s", "--teacher-weights", teacher, "--learning_rate", "0",
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
    monkeypatch.setattr(run_folder, "all_gather_object", lambda view: [view, None])  # rank 1 sees no file
    saver = run_folder.CheckpointSaver(str(save), DistInfo(), print)
    with pytest.raises(RunFolderError, match="must be a folder on a filesystem that every node shares"):
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
    data, teacher = tiny.data, tiny.teacher
    odd = tmp_path / "data"
    shutil.copytree(data, odd)
    os.rename(odd / "val" / "class1", odd / "val" / "other")
    p = train_here(1, odd, tmp_path / "s", "--teacher-weights", teacher, check=False)
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


@pytest.fixture
def one_process_group(monkeypatch):
    """torchrun's environment for one process: train() then makes a process group (gloo)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def test_a_stopped_run_destroys_its_process_group(tiny, tmp_path, monkeypatch, one_process_group):
    data, teacher = tiny.data, tiny.teacher
    enter = preempt.StopRequest.__enter__

    def enter_then_receive_sigterm(self):
        enter(self)
        self.signum = signal.SIGTERM
        return self

    monkeypatch.setattr(preempt.StopRequest, "__enter__", enter_then_receive_sigterm)
    p = train_here(1, data, tmp_path / "s", "--teacher-weights", teacher, check=False)
    assert p.returncode == EXIT_PREEMPTED and "stopped by SIGTERM" in p.stderr, p.stderr
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_an_error_of_each_process_leaves_a_gloo_process_group(tiny, tmp_path, monkeypatch, one_process_group,
                                                               backend):
    # Left behind, a gloo group may abort the process as it exits (exit code -6, not the error's 1);
    # a NCCL group stays, as its shutdown may wait for processes still in a collective.
    data, teacher = tiny.data, tiny.teacher
    odd = tmp_path / "data"
    shutil.copytree(data, odd)
    os.rename(odd / "val" / "class1", odd / "val" / "other")
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    try:
        p = train_here(1, odd, tmp_path / "s", "--teacher-weights", teacher, check=False)
        assert p.returncode == 1 and "only in train/: ['class1']" in p.stderr, p.stderr
        assert torch.distributed.is_initialized() == (backend == "nccl")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
