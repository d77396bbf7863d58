"""What every command-line entry point does with an error: one line, from the process that met it.

A `UserError` is a problem the user can fix (a flag, a file, the data, the disk); its message says
what is wrong and what to do. Entry points run their work inside `exit_on_error(log_dir)`: such an
error is printed as `error: <message>` on stderr, prefixed with `[rank R/W]` when several
processes run, appended to `<log_dir>/log.txt` when that folder exists (unless the folder is
another run's), and the process leaves the process group (utils.distributed.cleanup) and exits
with the error's exit code. Anything else is a bug: its traceback is printed, and appended to
log.txt too.
"""
import contextlib
import os
import sys
import traceback

from .logger import append_line

__all__ = ["UserError", "report", "exit_on_error"]


class UserError(Exception):
    """An error whose message names the problem and the fix; printed as one line."""

    exit_code = 1
    every_rank = True  # each process prints its own; False: all raise it together, rank 0 speaks for all
    logged = True  # appended to log_dir/log.txt; False: that folder belongs to another run

    def line(self) -> str:
        return f"error: {self}"


def report(line: str, log_dir: str | None = None) -> None:
    """`line` on stderr from this process (rank-prefixed when there are several) and in
    <log_dir>/log.txt when that folder exists."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        line = f"[rank {_rank()}/{world_size}] {line}"
    print(line, file=sys.stderr, flush=True)
    if log_dir and os.path.isdir(log_dir):
        try:
            append_line(os.path.join(log_dir, "log.txt"), line)
        except OSError:  # a full disk, say: the line is on stderr
            pass


@contextlib.contextmanager
def exit_on_error(log_dir: str | None = None):
    """Run the block; a UserError becomes its one line and its exit code (see the module
    docstring), any other exception keeps its traceback, which also goes to log.txt."""
    try:
        yield
    except UserError as e:
        from .distributed import cleanup  # here: the launcher imports this module before torch
        if e.every_rank or _rank() == 0:
            report(e.line(), log_dir if e.logged else None)
        cleanup(together=not e.every_rank)
        sys.exit(e.exit_code)
    except Exception:
        if log_dir and os.path.isdir(log_dir):
            append_line(os.path.join(log_dir, "log.txt"), traceback.format_exc().rstrip())
        raise


def _rank() -> int:
    from .distributed import get_rank  # here: the launcher imports this module before torch
    return get_rank()
