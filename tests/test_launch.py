"""The launcher through `bash step1/run.sh` as a user starts it: several nodes on this machine
(two train and resume together; one alone says what it waits for, stops on SIGTERM, and ends in
one line when the others do not come), a Python without torch, and environment variables that
cannot work, each said in one line before anything starts or waits."""
import contextlib
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.test_resume import kill_tree
from tests.tiny import ROOT, env, free_port, make_image_folder, make_teacher, step_command
from utils.checkpoint import read_checkpoint
from utils.preempt import EXIT_PREEMPTED

AGREE = ("NNODES (2)", "NPROC_PER_NODE (1)", "MASTER_ADDR (127.0.0.1)", "MASTER_PORT (", "a NODE_RANK of its own below NNODES")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """2 classes; 12 train images (3 iterations of 4 over both nodes), 2 val images."""
    root = tmp_path_factory.mktemp("launch")
    data = make_image_folder(root / "data", classes=2, train_per_class=6, val_per_class=1)
    return data, make_teacher(root / "teacher.pth", num_classes=2)


@pytest.fixture
def start():
    """`start(data, teacher, save, node_rank, port, *flags, **env)`: node `node_rank` of NNODES=2 on
    this machine, through step1/run.sh, its output unbuffered (read_until, then finish); what still
    runs after the test is killed."""
    started = []

    def node(data, teacher, save, node_rank, port, *flags, **extra_env):
        cmd = step_command(1, data, save, "--teacher-weights", teacher, "--deterministic", *flags)
        variables = dict(NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                         OMP_NUM_THREADS="1", **extra_env)
        started.append(subprocess.Popen(cmd, cwd=ROOT, env=env(**variables), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, bufsize=0))
        return started[-1]

    yield node
    for proc in started:
        kill_tree(proc)


def read_until(proc, text, timeout=120) -> str:
    """What proc prints on stdout until a line holds `text`, read within `timeout` s."""
    seen, deadline = b"", time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and text.encode() not in seen.rsplit(b"\n", 1)[0]:
            if selector.select(timeout=0.5):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
    assert text.encode() in seen, f"no line with {text!r} within {timeout} s:\n{seen.decode()[-2000:]}"
    return seen.decode()


def finish(proc, timeout=600) -> tuple:
    """The rest of proc's stdout and its stderr, once it has ended."""
    out, err = proc.communicate(timeout=timeout)
    return out.decode(), err.decode()


def listening(port: int) -> bool:
    """Whether a socket of this machine listens on `port` (from /proc/net)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for row in f.readlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def node_zero_waiting(start, data, teacher, save, *flags, **extra_env):
    """Node 0 of 2, started on a free port and listening on it for the other node (another port
    when the one found free was taken meanwhile); returns (process, port, what it printed)."""
    for _ in range(3):
        port = free_port()
        proc = start(data, teacher, save, 0, port, *flags, **extra_env)
        out = read_until(proc, "waiting up to")
        while proc.poll() is None and not listening(port):
            time.sleep(0.05)
        if proc.poll() is None or b"is in use" not in proc.stderr.read():
            return proc, port, out
    raise AssertionError("no free port for node 0")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_two_nodes_train_and_a_relaunch_of_both_resumes(tiny, tmp_path, start):
    data, teacher = tiny
    save = tmp_path / "save"
    for launch in range(2):  # the first stops after epoch 0, the second resumes and finishes epoch 1
        flags = ("--epochs", 2, "--stop-after-epochs", 1)
        node0, port, out0 = node_zero_waiting(start, data, teacher, save, *flags)
        assert f"=> node 0 of 2, 1 process(es): waiting up to 600 s (RENDEZVOUS_TIMEOUT) for the other 1 node(s) " \
               f"at 127.0.0.1:{port}" in out0
        node1 = start(data, teacher, save, 1, port, *flags)
        (out0, err0), (out1, err1) = finish(node0), finish(node1)
        assert (node0.returncode, node1.returncode) == (0, 0), err0 + err1
        assert "=> all 2 nodes are here: node 0 starts 1 process(es)" in out0
        assert "=> all 2 nodes are here: node 1 starts 1 process(es)" in out1
        assert "2 process(es) x batch 2" in out0 and "Epoch: [" not in out1  # rank 0 prints for both
        assert ("resuming from" in out0) == (launch == 1)
    assert "1 epochs done" in out0 and "=> done" in out0
    assert read_checkpoint(save / "checkpoint.pth.tar")["epoch"] == 2
    assert read_checkpoint(save / "checkpoint.pth.tar")["world_size"] == 2


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_node_0_alone_says_what_it_waits_for_and_stops_within_5_s_of_sigterm(tiny, tmp_path, start):
    data, teacher = tiny
    proc, port, out = node_zero_waiting(start, data, teacher, tmp_path / "save")
    assert all(setting in out for setting in AGREE), out
    time.sleep(1)  # well inside the wait
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc, timeout=60)
    assert time.monotonic() - sent < 5
    assert proc.returncode == EXIT_PREEMPTED, err
    assert err == ("=> stopped by SIGTERM while the nodes waited for each other: nothing to save yet; relaunch the "
                   "same command\n")
    assert not (tmp_path / "save").exists()


@pytest.mark.parametrize("node_rank, says", [(0, "only 1 of 2 nodes came to 127.0.0.1:{port} within 2 s"),
                                             (1, "node 0 did not answer at 127.0.0.1:{port} within 2 s")],
                         ids=["node 0", "node 1"])
def test_a_node_alone_ends_in_one_line_after_rendezvous_timeout(tiny, tmp_path, start, node_rank, says):
    data, teacher = tiny
    port = free_port()
    proc = start(data, teacher, tmp_path / "save", node_rank, port, RENDEZVOUS_TIMEOUT="2")
    out, err = finish(proc, timeout=120)
    assert proc.returncode == 1, err
    assert err.startswith(f"error: {says.format(port=port)} (RENDEZVOUS_TIMEOUT): ") and err.count("\n") == 1, err
    assert all(setting in err for setting in AGREE), err
    assert f"(this one: {node_rank})" in err and "waiting up to 2 s" in out


def test_a_master_port_in_use_is_one_line(tiny, tmp_path, start):
    data, teacher = tiny
    with socket.create_server(("", 0)) as taken:  # another program listens there
        port = taken.getsockname()[1]
        out, err = finish(start(data, teacher, tmp_path / "save", 0, port), timeout=120)
    assert err == f"error: MASTER_PORT {port} is in use on node 0 (another run, or another program): pick a free " \
                  "port, the same on every node\n"


def test_a_python_without_torch_says_so_in_one_line(tiny, tmp_path):
    data, teacher = tiny
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv"], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    p = subprocess.run(step_command(1, data, tmp_path / "save"), cwd=ROOT, env=env(PYTHON=python),
                       capture_output=True, text=True, timeout=60)
    set_up = re.search(r"^(python3 -m venv .*)$", open(os.path.join(ROOT, "README.md")).read(), re.M)[1]
    assert p.returncode == 1
    assert p.stderr == f"error: torch is not installed for {python}, the Python run.sh ran (PYTHON, else the python " \
                       f"on PATH): activate the environment the README sets up, or set it up: {set_up}\n"


BAD_VARIABLES = [
    (dict(NPROC_PER_NODE="abc"), "NPROC_PER_NODE must be a whole number, at least 1 (the processes on this node; "
                                 "unset: one per GPU, or 1 without GPUs), got 'abc'"),
    (dict(NPROC_PER_NODE="0"), "NPROC_PER_NODE must be a whole number, at least 1 "),
    (dict(NNODES="x"), "NNODES must be a whole number, at least 1 (the number of nodes), got 'x'"),
    (dict(NNODES="2", NODE_RANK="2"), "NODE_RANK must be a whole number from 0 to 1 (this node's place among NNODES=2, "
                                      "0 on the node MASTER_ADDR names), got '2'"),
    (dict(NNODES="2", NODE_RANK="-1"), "NODE_RANK must be a whole number from 0 to 1 "),
    (dict(NNODES="2", MASTER_PORT="abc"), "MASTER_PORT must be a whole number from 1 to 65535 (a free TCP port on "
                                          "node 0), got 'abc'"),
    (dict(MASTER_PORT="70000"), "MASTER_PORT must be a whole number from 1 to 65535 "),
    (dict(NNODES="2", RENDEZVOUS_TIMEOUT="soon"), "RENDEZVOUS_TIMEOUT must be a whole number, at least 1 (seconds "),
]


@pytest.mark.parametrize("variables, message", BAD_VARIABLES,
                         ids=[" ".join(f"{k}={v}" for k, v in variables.items()) for variables, _ in BAD_VARIABLES])
def test_an_environment_variable_that_cannot_work_is_one_line_before_anything_starts(tiny, tmp_path, variables,
                                                                                      message):
    data, teacher = tiny
    p = subprocess.run(step_command(1, data, tmp_path / "save"), cwd=ROOT, env=env(**variables),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith(f"error: {message}") and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "save").exists()
