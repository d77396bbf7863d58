"""The errors a user can fix, each printed as one line (utils/cli.py's `exit_on_error`).

A `UserError`'s message names the problem and the fix: a flag, a file, the data, the disk. Its
kinds say where the problem is; a stop signal's `Stopped` is in utils/preempt.py, with the
signals and their exit codes. This module imports nothing, so that every layer may raise them.
"""

__all__ = ["UserError", "ConfigError", "DataError", "CheckpointError", "RunFolderError", "FolderInUse",
           "NonFiniteLoss", "first_few"]


def first_few(items: list, show: int) -> str:
    """The first `show` of `items` for a message, and how many more: 'a, b, c (+4 more)'."""
    more = f" (+{len(items) - show} more)" if len(items) > show else ""
    return ", ".join(map(str, items[:show])) + more


class UserError(Exception):
    """An error whose message names the problem and the fix; printed as one line."""

    exit_code = 1
    every_rank = True  # each process prints its own; False: all raise it together, rank 0 speaks for all
    logged = True  # appended to log_dir/log.txt; False: that folder belongs to another run

    def line(self) -> str:
        return f"error: {self}"


class ConfigError(UserError):
    """A flag that cannot work, found before anything is loaded (utils/launch.py checks these
    before it starts any process)."""


class DataError(UserError, ValueError):
    """A data folder that cannot be used; the message says why."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


class RunFolderError(UserError):
    """A --save folder that this run cannot use as it is; the message says why and the way out."""


class FolderInUse(RunFolderError):
    """--save is locked by a running run: rank 0 says so for all, and nothing is written into that
    run's folder (not even its log.txt)."""
    every_rank = logged = False


class NonFiniteLoss(UserError, RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and iteration."""
