"""The launch both steps share: torchrun running `utils.train`, one process per visible GPU (one
without GPUs). step1/run.sh and step2/run.sh run `python -m utils.launch --step N "$@"`.

Environment: NPROC_PER_NODE (processes on this node; default: the GPUs, or 1), NNODES,
NODE_RANK, MASTER_ADDR, MASTER_PORT (several nodes; without them one node on a free port).

What it adds to torchrun, none of which hides a worker's message or exit code:
- `--help`, usage errors and flags that cannot work (utils.config) are answered before any
  worker starts, each a usage error or a one-line error with exit code 1;
- SIGTERM, SIGUSR1 and SIGINT are passed on to the workers, which save and stop
  (utils/preempt.py); a second one kills them. A stop signal that comes before the workers can
  handle it ends the launch with the same exit code (75, or 130 for SIGINT): nothing was
  trained yet, and a requeueing script relaunches as it would after a save;
- the exit code is the failing worker's (one killed by a signal: 128 + N, as a shell reports,
  with a line saying so); torchrun's own traceback is left out, the worker has said why;
- torchrun's log folder is a temporary one, removed at the end.
"""
import os
import signal
import sys
import threading
import time

from utils.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED, STOP_SIGNALS


def children() -> list:
    """Process ids whose parent is this process (torchrun's workers), from /proc."""
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                    found.append(int(pid))
        except (OSError, IndexError, ValueError):
            pass  # the process ended meanwhile
    return found


def pass_on_stop_signals() -> list:
    """torchrun starts its workers detached from the terminal (setsid), so that a terminal's Ctrl-C
    reaches only this process: hand each stop signal on to them (SIGKILL from the second one on), also to workers
    that start within the next 30 s. Returns the list the received signals are appended to."""
    received = []

    def send(sig) -> bool:
        pids = children()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return bool(pids)

    def send_when_started(sig):
        deadline = time.monotonic() + 30
        while not send(sig) and time.monotonic() < deadline:
            time.sleep(0.05)

    def handler(signum, frame):
        received.append(signum)
        sig = signum if len(received) == 1 else signal.SIGKILL
        if not send(sig):  # torchrun is starting them
            threading.Thread(target=send_when_started, args=(sig,), daemon=True).start()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    # torchrun would replace these handlers with its own, which kill the workers 30 s later
    # (its --signals-to-handle, read from PET_SIGNALS_TO_HANDLE).
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    return received


def torchrun_args(nproc: int, env=os.environ) -> list:
    if env.get("NNODES", "1") == "1" and not (env.get("MASTER_ADDR") or env.get("MASTER_PORT")):
        rendezvous = ["--standalone"]  # a single node on a free local port
    else:
        rendezvous = ["--nnodes", env.get("NNODES", "1"), "--node_rank", env.get("NODE_RANK", "0"),
                      "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"),
                      "--master_port", env.get("MASTER_PORT", "29500")]
    return [*rendezvous, "--nproc_per_node", str(nproc)]


def stopped_before_training(signum: int) -> int:
    print(f"=> stopped by {signal.Signals(signum).name} before training started: nothing to save yet; "
          "relaunch the same command", file=sys.stderr)
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


def main(argv: list) -> int:
    received = pass_on_stop_signals()  # first: a scheduler may signal from the first second
    import logging
    import shutil
    import tempfile

    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from utils.config import parse_args, resolve_args
    from utils.errors import ConfigError

    nproc = int(os.environ.get("NPROC_PER_NODE") or max(torch.cuda.device_count(), 1))
    # The flags first, here: `--help`, a usage error or a flag that cannot work is said once,
    # before any process starts (a worker's own message could be cut short by torchrun
    # stopping the others).
    nodes = int(os.environ.get("NNODES", "1").split(":")[-1])  # "MIN:MAX" in an elastic launch
    try:
        resolve_args(parse_args(argv), world_size=nproc * nodes)
    except ConfigError as e:
        print(e.line(), file=sys.stderr)
        return 1
    if received:
        return stopped_before_training(received[0])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's choice, without its warning
    log_dir = tempfile.mkdtemp(prefix="adambnn_torchrun_")
    try:
        torchrun([*torchrun_args(nproc), "--log-dir", log_dir, "-m", "utils.train", *argv])
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code >= 0:
            return code
        if received and -code in STOP_SIGNALS:  # the signal came before the worker could handle it
            return stopped_before_training(received[0])
        name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
        print(f"error: process {rank} was killed by {name}"
              + (" (out of memory?)" if -code == signal.SIGKILL else ""), file=sys.stderr)
        return 128 - code
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
