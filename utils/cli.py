"""The command line every entry point shares: its parser, the flags training and evaluation have
in common with their checks, and what an entry point does with an error.

`Parser` accepts each long flag with '-' or '_' between its words (the original's flags have
underscores, the additions hyphens); help and messages use the spelling it was declared with. A
usage error (an unknown flag, a value of the wrong type) exits 1, as every other error does.

A `UserError` (utils/errors.py) is a problem the user can fix. Entry points run their work inside
`exit_on_error(log_dir)`: such an error is printed as `error: <message>` on stderr, prefixed with
`[rank R/W]` when several processes run, appended to `<log_dir>/log.txt` when that folder exists
(unless the folder is another run's), and the process leaves the process group
(utils.distributed.cleanup) and exits with the error's exit code. Anything else is a bug: its
traceback is printed, and appended to log.txt too.
"""
import argparse
import contextlib
import os
import sys
import traceback

from . import recipe
from .distributed import cleanup, get_rank
from .errors import ConfigError, UserError
from .logger import append_line, printable
from .precision import PRECISIONS

__all__ = ["Parser", "HelpFormatter", "flag_names", "add_loader_flags", "add_device_flags", "check_at_least",
           "check_input_size", "check_writable", "check_output_file", "check_batch_split", "check_data_backend",
           "resolve_device_layout", "say", "report", "exit_on_error"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or off, or its help says it already; shows each
    flag in one spelling."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action):
        aliases = getattr(action, "aliases", ())
        if not aliases:
            return super()._format_action_invocation(action)
        shown = argparse.Action(_shown(action), action.dest, nargs=action.nargs, choices=action.choices,
                                metavar=action.metavar)
        return super()._format_action_invocation(shown)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that also accepts each long flag with its '-' and '_' swapped, shows the
    flags with HelpFormatter unless told otherwise, and exits 1 on a usage error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        swapped = [alias for name in names if name.startswith("--")
                   for alias in (name.replace("_", "-"), "--" + name[2:].replace("-", "_"))
                   if alias not in names]
        action = super().add_argument(*names, *dict.fromkeys(swapped), **kwargs)
        # BooleanOptionalAction adds a --no- form of each spelling: those of the swapped ones too.
        action.aliases = [s for s in action.option_strings if s not in names
                          and not (s.startswith("--no-") and "--" + s[5:] in names)]
        return action

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _shown(action) -> list:
    """The spellings of `action` that help and messages use."""
    return [s for s in action.option_strings if s not in getattr(action, "aliases", ())]


def flag_names(parser: argparse.ArgumentParser) -> dict:
    """{dest: the flag as --help spells it} of each option, e.g. {'input_size': '--input-size',
    'workers': '-j/--workers'}."""
    return {a.dest: "/".join(_shown(a)) for a in parser._actions if a.option_strings and a.dest != "help"}


# ---------------------------------------------------------------------------------------------
# The flags training and evaluation share, and their checks


def add_loader_flags(p, input_size=recipe.COMMON["input_size"], input_size_help="train crop size, a multiple of 32; "
                     "validation resizes to size*256/224 and centre-crops"):
    """--batch_size, -j/--workers, --input-size and --data-backend: how the images reach the model."""
    p.add_argument("--batch_size", type=int, default=recipe.COMMON["batch_size"],
                   help="global batch size, split evenly over the processes")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="data-loading workers per process (default: the CPUs this process may use, "
                        "shared by the node's processes, at most 8)")
    p.add_argument("--input-size", type=int, default=input_size, help=input_size_help)
    p.add_argument("--data-backend", choices=("pil", "torch"), default="pil",
                   help="pil: decode and augment in the loader workers (the original's transforms); "
                        "torch: workers read the bytes, this process decodes (nvjpeg on CUDA) and "
                        "augments batches on its device, the same parameters and pixels")


def add_device_flags(p, compile_help="torch.compile student and teacher with BACKEND (default: inductor with "
                     "CUDA, off on CPU)", compile_default=None):
    """--precision, --channels-last and --compile/--no-compile: the arithmetic and the device layout
    (their defaults: resolve_device_layout)."""
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32: true float32, TF32 off (the recipe's arithmetic, as on the authors' V100s); "
                        "tf32: float32 with TF32 matmuls and convolutions on CUDA; bf16: bf16 autocast "
                        "for student and teacher, the loss in float32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on with CUDA, off on CPU)")
    p.add_argument("--compile", nargs="?", const="inductor", default=compile_default, metavar="BACKEND",
                   help=compile_help)
    p.add_argument("--no-compile", dest="compile", action="store_const", const="none", help="do not compile")


def resolve_device_layout(args, cuda: bool) -> None:
    """The device layout where the flags leave it open: channels_last and torch.compile (inductor)
    on with CUDA, both off on a CPU."""
    if args.channels_last is None:
        args.channels_last = cuda
    if args.compile is None:
        args.compile = "inductor" if cuda else "none"


def check_at_least(*checks) -> None:
    """ConfigError for the first (flag, value, least) whose value is below least (None: not given)."""
    for flag, value, least in checks:
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")


def check_input_size(size, flag="--input-size") -> None:
    """A network input side (None: not given): at least 32 and a multiple of 32."""
    check_at_least((flag, size, 32))
    if size is not None and size % 32:
        raise ConfigError(f"{flag} {size} is not a multiple of 32: ReActNet-A halves the resolution five times "
                          "(224 is the recipe's)")


def check_writable(folder: str, flag: str, given: str | None = None) -> None:
    """`folder`, or the nearest parent that exists, must be a folder this user can write to
    (nothing is created); the error names `flag` and what was `given` for it (default: `folder`)."""
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {given or folder}: {existing} is not a folder this user can write to")


def check_output_file(path: str | None, flag: str, example: str) -> None:
    """A file an entry point will write (None: not given), checked before any work: not a folder
    (`example`: a file name to suggest in it), in a folder this user can write to or create."""
    if path is None:
        return
    if os.path.isdir(path) or path.endswith(os.sep):
        raise ConfigError(f"{flag} {path} names a folder: give a file's path, e.g. {os.path.join(path, example)}")
    check_writable(os.path.dirname(os.path.abspath(path)), flag, path)


def check_data_backend(backend: str) -> None:
    """--data-backend torch needs TorchCodec (utils.torch_data.check_decoder), imported only then."""
    if backend == "torch":
        from .torch_data import check_decoder
        check_decoder()


def check_batch_split(batch_size: int, world_size: int) -> None:
    """The global --batch_size splits evenly over the processes."""
    if batch_size % world_size:
        raise ConfigError(f"--batch_size {batch_size} (global) does not split evenly over {world_size} "
                          f"processes: use a multiple of {world_size}")


# ---------------------------------------------------------------------------------------------
# Errors


def say(line: str) -> None:
    """`line` on stdout, whatever file names it holds (utils.logger.printable)."""
    print(printable(line), flush=True)


def report(line: str, log_dir: str | None = None) -> None:
    """`line` on stderr from this process (rank-prefixed when there are several) and in
    <log_dir>/log.txt when that folder exists."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        line = f"[rank {get_rank()}/{world_size}] {line}"
    print(printable(line), file=sys.stderr, flush=True)
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
        if e.every_rank or get_rank() == 0:
            report(e.line(), log_dir if e.logged else None)
        cleanup(together=not e.every_rank)
        sys.exit(e.exit_code)
    except Exception:
        if log_dir and os.path.isdir(log_dir):
            append_line(os.path.join(log_dir, "log.txt"), traceback.format_exc().rstrip())
        raise
