"""Stopping a run cleanly on the signals a cluster sends before it kills a job.

SIGTERM (SLURM preemption and scancel, Kubernetes eviction, torchrun passing one on), SIGUSR1
(SLURM's `--signal=USR1@120` warning) and SIGHUP (a closed terminal or a dropped SSH session)
make every process finish its iteration; rank 0 then saves a mid-epoch checkpoint and the run
exits with EXIT_PREEMPTED. SIGINT (Ctrl-C) does the same and exits with EXIT_INTERRUPTED.
Relaunching the same command continues mid-epoch. A closed terminal, which comes with SIGHUP,
also makes every write to it fail: `survive_lost_console` lets the run go on to its save.
"""
import ctypes
import os
import signal
import sys

from .errors import UserError

__all__ = ["EXIT_PREEMPTED", "EXIT_INTERRUPTED", "STOP_SIGNALS", "StopRequest", "Stopped", "exit_code_of",
           "exit_with_parent", "survive_lost_console"]

EXIT_PREEMPTED = 75     # EX_TEMPFAIL: "try again later", what a requeueing scheduler wants to see
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)


def exit_code_of(signum: int) -> int:
    """The exit code of a run stopped by `signum`."""
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


class StopRequest:
    """While entered, catches STOP_SIGNALS; calling it says whether one has arrived. A second
    signal changes nothing (SLURM may signal both the launcher, which passes it on, and the
    worker)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        """The signal's name; another process's when this one received none (they stop together)."""
        return signal.Signals(self.signum).name if self() else "a signal to another process"

    @property
    def exit_code(self) -> int:
        return exit_code_of(self.signum)


class Stopped(UserError):
    """A stop signal ended the run, after saving what there was to save; `exit_code` is 75 (or
    130 for SIGINT). Stopped together, the processes leave the message to rank 0."""

    every_rank = False

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def line(self) -> str:
        return str(self)

    @classmethod
    def by(cls, stop: StopRequest, where: str, checkpoint: str) -> "Stopped":
        return cls(f"=> stopped by {stop.name} {where}: saved {checkpoint}; relaunch the same command to "
                   "continue", stop.exit_code)

    @classmethod
    def during_start_up(cls, stop: StopRequest) -> "Stopped":
        return cls(f"=> stopped by {stop.name} during start-up: nothing to save yet; relaunch the same command",
                   stop.exit_code)


def exit_with_parent(sig=signal.SIGTERM) -> None:
    """Linux: have the kernel send `sig` to this process when its parent (the torchrun launcher)
    dies, so that a worker whose launcher was killed saves and stops instead of training on,
    orphaned. Elsewhere a no-op."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Console:
    """sys.stdout or sys.stderr of a process whose terminal may go away (a closed window, a dropped
    SSH session, a `| tee` that died with them): the first write or flush that fails (EIO, EPIPE)
    points the stream's file descriptor at /dev/null and is done again, so that the run goes on
    to save and stop (log.txt keeps its lines) instead of dying of the failed write."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError:
            self._lose()
            return self._stream.write(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            self._lose()
            self._stream.flush()

    def _lose(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # also for what else writes there: C++, other threads
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_lost_console() -> None:
    """Have this process's standard output and error outlive their terminal (see _Console). Only
    the process's own streams are wrapped, not ones a caller put in their place (a test's)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and stream is getattr(sys, f"__{name}__"):
            setattr(sys, name, _Console(stream))
