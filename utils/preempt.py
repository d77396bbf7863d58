"""Stopping a run cleanly on the signals a cluster sends before it kills a job.

SIGTERM (SLURM preemption and scancel, Kubernetes eviction, torchrun passing one on) and
SIGUSR1 (SLURM's `--signal=USR1@120` warning) make every process finish its iteration; rank 0
then saves a mid-epoch checkpoint and the run exits with EXIT_PREEMPTED. SIGINT (Ctrl-C) does
the same and exits with EXIT_INTERRUPTED. Relaunching the same command continues mid-epoch.
"""
import ctypes
import signal

from .errors import UserError

__all__ = ["EXIT_PREEMPTED", "EXIT_INTERRUPTED", "STOP_SIGNALS", "StopRequest", "Stopped", "exit_with_parent"]

EXIT_PREEMPTED = 75     # EX_TEMPFAIL: "try again later", what a requeueing scheduler wants to see
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_PREEMPTED


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
