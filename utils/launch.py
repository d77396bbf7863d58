"""The launch both steps share: torchrun running `utils.train`, one process per visible GPU (one
without GPUs). step1/run.sh and step2/run.sh run `python -m utils.launch --step N "$@"`.

Environment: NPROC_PER_NODE (processes on this node; default: the GPUs, or 1), NNODES,
NODE_RANK, MASTER_ADDR, MASTER_PORT (several nodes; without them one node on a free port),
RENDEZVOUS_TIMEOUT (seconds the nodes wait for each other at start-up; default 600).

What it adds to torchrun, none of which hides a worker's message or exit code:
- a Python without torch, an environment variable that cannot work, `--help`, usage errors and
  flags that cannot work (utils.config) are answered in one line before any process starts;
- with several nodes, each says what it waits for, and nodes that do not all come within
  RENDEZVOUS_TIMEOUT end in one line naming the settings every node must agree on. torchrun's
  agent runs in a thread, so that this process handles signals while the agent waits (a C++
  call that no signal handler interrupts);
- SIGTERM, SIGUSR1, SIGHUP and SIGINT are passed on to the workers, which save and stop
  (utils/preempt.py); a second one kills them, and this says that the progress since the last
  checkpoint is lost. A stop signal that comes before the workers can handle it (while the nodes
  wait for each other, say) ends the launch at once with the same exit code (75, or 130 for
  SIGINT): nothing was trained yet, and a requeueing script relaunches as it would after a save;
- the exit code is the failing worker's (one killed by a signal: 128 + N, as a shell reports,
  with a line saying so); torchrun's own traceback is left out, the worker has said why;
- torchrun's log folder is a temporary one, removed at the end.
"""
import dataclasses
import importlib.util
import os
import re
import shutil
import signal
import sys
import threading

from utils.errors import UserError
from utils.preempt import STOP_SIGNALS, exit_code_of, survive_lost_console

__all__ = ["Launch", "LaunchError", "main"]

SET_UP = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt"  # README.md's
RENDEZVOUS_TIMEOUT = 600  # torchrun's own default for the static rendezvous


class LaunchError(UserError):
    """A launch that cannot work: no torch, an environment variable out of range, nodes that did
    not meet."""


def whole_number(env, name: str, default: int | None, low: int, high: int | None = None, what: str = ""):
    """The environment variable `name` as an int from `low` to `high` (`default` when unset or empty)."""
    value = env.get(name)
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bounds = f" from {low} to {high}" if high is not None else f", at least {low}"
        raise LaunchError(f"{name} must be a whole number{bounds} ({what}), got {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class Launch:
    """This launch's processes and the nodes they meet, as the environment gives them (see the
    module docstring), checked in `from_env`."""

    nproc: int | None  # None: one per GPU, or 1 (known once torch is imported)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout: int = RENDEZVOUS_TIMEOUT
    standalone: bool = True  # one node on a free local port (torchrun --standalone)

    @classmethod
    def from_env(cls, env=os.environ) -> "Launch":
        nnodes = whole_number(env, "NNODES", 1, 1, what="the number of nodes")
        return cls(
            nproc=whole_number(env, "NPROC_PER_NODE", None, 1,
                               what="the processes on this node; unset: one per GPU, or 1 without GPUs"),
            nnodes=nnodes,
            node_rank=whole_number(env, "NODE_RANK", 0, 0, nnodes - 1,
                                   what=f"this node's place among NNODES={nnodes}, 0 on the node MASTER_ADDR names"),
            master_addr=env.get("MASTER_ADDR") or cls.master_addr,
            master_port=whole_number(env, "MASTER_PORT", cls.master_port, 1, 65535, what="a free TCP port on node 0"),
            timeout=whole_number(env, "RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT, 1,
                                 what="seconds the nodes wait for each other at start-up"),
            standalone=nnodes == 1 and not env.get("MASTER_ADDR") and not env.get("MASTER_PORT"))

    def torchrun_args(self) -> list:
        rendezvous = ["--standalone"] if self.standalone else [
            "--nnodes", str(self.nnodes), "--node_rank", str(self.node_rank), "--master_addr", self.master_addr,
            "--master_port", str(self.master_port), "--rdzv-conf", f"timeout={self.timeout}"]
        return [*rendezvous, "--nproc_per_node", str(self.nproc)]

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    def agreement(self) -> str:
        """What every node must be launched with."""
        return (f"every node needs the same NNODES ({self.nnodes}), NPROC_PER_NODE ({self.nproc}), MASTER_ADDR "
                f"({self.master_addr}) and MASTER_PORT ({self.master_port}), and a NODE_RANK of its own below NNODES "
                f"(this one: {self.node_rank})")

    def waiting(self) -> str:
        who = (f"for the other {self.nnodes - 1} node(s) at {self.endpoint}" if self.node_rank == 0 else
               f"for node 0 at {self.endpoint} and the others")
        return (f"=> node {self.node_rank} of {self.nnodes}, {self.nproc} process(es): waiting up to {self.timeout} s "
                f"(RENDEZVOUS_TIMEOUT) {who}; {self.agreement()}")

    def not_met(self, error: Exception) -> str:
        """The one line of a rendezvous that failed with torchrun's `error`."""
        message = str(error)
        if "EADDRINUSE" in message:
            return (f"MASTER_PORT {self.master_port} is in use on node 0 (another run, or another program): pick a "
                    "free port, the same on every node")
        joined = re.search(r"(\d+)/\d+ clients joined", message)  # node 0's
        if joined:
            came = f"only {joined[1]} of {self.nnodes} nodes came to {self.endpoint}"
        elif "trying to connect" in message:  # another node's
            came = f"node 0 did not answer at {self.endpoint}"
        else:
            came = f"not all {self.nnodes} nodes came to {self.endpoint}"
        return f"{came} within {self.timeout} s (RENDEZVOUS_TIMEOUT): start every node within that time; {self.agreement()}"


def require_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        raise LaunchError(f"torch is not installed for {sys.executable}, the Python run.sh ran (PYTHON, else the "
                          f"python on PATH): activate the environment the README sets up, or set it up: {SET_UP}")


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


def send(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def pass_on_stop_signals() -> list:
    """torchrun starts its workers detached from the terminal (setsid), so that a terminal's Ctrl-C
    or hang-up reaches only this process: hand each stop signal on to them (SIGKILL from the second
    one on). Returns the list the received signals are appended to."""
    received = []

    def handler(signum, frame):
        received.append(signum)
        send(children(), signum if len(received) == 1 else signal.SIGKILL)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    return received


def stopped_before_training(signum: int, when: str = "before training started") -> int:
    print(f"=> stopped by {signal.Signals(signum).name} {when}: nothing to save yet; relaunch the same command",
          file=sys.stderr)
    return exit_code_of(signum)


def run_agent(torchrun, argv: list, launch: Launch, received: list) -> tuple:
    """torchrun(argv) in a thread, while this (main) thread handles the signals; returns the exit
    code and the thread, which still runs (inside the rendezvous) when a stop signal came before
    the workers started: the launch then ends at once, with nothing to save."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    ended = []

    def agent():
        try:
            torchrun(argv)
            ended.append(None)
        except BaseException as e:  # noqa: BLE001 -- said by the main thread
            ended.append(e)

    thread = threading.Thread(target=agent, name="torchrun", daemon=True)
    thread.start()
    workers = []
    while thread.is_alive() and not workers:  # the nodes meet, then the agent starts the workers
        if received:
            return stopped_before_training(received[0], "while the nodes waited for each other"
                                           if launch.nnodes > 1 else "before training started"), thread
        thread.join(0.1)  # a signal interrupts the join: its handler runs
        workers = children()
    if workers and launch.nnodes > 1:
        print(f"=> all {launch.nnodes} nodes are here: node {launch.node_rank} starts {len(workers)} process(es)",
              flush=True)
    if workers and received:  # the signal came as they started: the handler found none to pass it on to
        send(workers, received[0])
    thread.join()
    error = ended[0]
    if error is None:
        return 0, thread
    if isinstance(error, ChildFailedError):
        return worker_failed(error, received), thread
    if isinstance(error, DistError) and not workers:  # the nodes did not meet
        print(LaunchError(launch.not_met(error)).line(), file=sys.stderr)
        return 1, thread
    raise error


def main(argv: list) -> int:
    received = pass_on_stop_signals()  # first: a scheduler may signal from the first second
    survive_lost_console()
    try:
        launch = Launch.from_env()
        require_torch()
    except LaunchError as e:
        print(e.line(), file=sys.stderr)
        return 1
    import logging
    import tempfile

    # The agent's C++ store logs each failed connection with a stack of frames: this process says
    # what failed in one line instead. The workers keep the user's setting.
    cpp_log_level = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = cpp_log_level or "FATAL"  # read once, as torch loads
    import torch
    from torch.distributed.run import main as torchrun
    if cpp_log_level is None:
        del os.environ["TORCH_CPP_LOG_LEVEL"]

    from utils.config import parse_args, resolve_args
    from utils.errors import ConfigError

    launch = dataclasses.replace(launch, nproc=launch.nproc or max(torch.cuda.device_count(), 1))
    # The flags first, here: `--help`, a usage error or a flag that cannot work is said once,
    # before any process starts (a worker's own message could be cut short by torchrun
    # stopping the others).
    try:
        resolve_args(parse_args(argv), world_size=launch.nproc * launch.nnodes)
    except ConfigError as e:
        print(e.line(), file=sys.stderr)
        return 1
    if received:
        return stopped_before_training(received[0])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if launch.nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's choice, without its warning
    if launch.nnodes > 1:
        print(launch.waiting(), flush=True)
    log_dir = tempfile.mkdtemp(prefix="adambnn_torchrun_")
    try:
        code, agent = run_agent(torchrun, [*launch.torchrun_args(), "--log-dir", log_dir, "-m", "utils.train", *argv],
                                launch, received)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    if agent.is_alive():  # inside the rendezvous's C++ wait, which would hold up an exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def worker_failed(error, received: list) -> int:
    """The exit code of a launch whose worker failed, and the line that says why when the worker
    could not say it (killed by a signal)."""
    rank, failure = error.get_first_failure()
    code = failure.exitcode
    if code >= 0:
        return code
    if received and -code in STOP_SIGNALS:  # the signal came before the worker could handle it
        return stopped_before_training(received[0])
    if received[1:] and -code == signal.SIGKILL:  # killed by this launcher on the second signal
        print(f"=> stopped at once by a second {signal.Signals(received[1]).name}: the training processes were "
              "killed, so the progress since the last checkpoint is lost; relaunch the same command to continue "
              "from that checkpoint", file=sys.stderr)
        return exit_code_of(received[0])
    name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
    print(f"error: process {rank} was killed by {name}"
          + (" (out of memory?)" if -code == signal.SIGKILL else ""), file=sys.stderr)
    return 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
