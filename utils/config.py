"""The command line of both steps: the flags with the step's defaults (utils/recipe.py), and every
check that can be made before anything is loaded.

`bash stepN/run.sh` passes `--step N` first, so `--help` shows that step's defaults. The parser,
the flags evaluate.py shares and their checks are utils/cli.py's.
"""
import argparse
import math
import os

import torch

from . import recipe
from .cli import (Parser, add_device_flags, add_loader_flags, check_at_least, check_batch_split, check_data_backend,
                  check_input_size, check_writable, resolve_device_layout)
from .errors import ConfigError

__all__ = ["get_parser", "parse_args", "resolve_args", "schedule_warnings"]

MAX_SEED = 2 ** 32 - 1


def get_parser(step: int | None = None) -> argparse.ArgumentParser:
    """The flags, with `step`'s defaults when it is known (stepN/run.sh passes it)."""
    defaults = recipe.STEPS.get(step, {})
    p = Parser(description=f"AdamBNN step {step}: " + recipe.STEP_DESCRIPTIONS[step] if step else
               "Train ReActNet-A the AdamBNN way, either step.")
    p.add_argument("--step", type=int, choices=(1, 2), required=step is None, default=step,
                   help="1: binary activations, real weights; 2: binary weights and activations"
                   if step is None else argparse.SUPPRESS)
    # The original's flags, same names and meanings.
    p.add_argument("--data", default=os.environ.get("DATA"),
                   help="ImageFolder root with train/ and val/ (default: $DATA)")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="initial learning rate (default: 1.25e-3 for adam and adamw, 0.1 for sgd)")
    p.add_argument("--epochs", type=int, default=recipe.COMMON["epochs"])
    p.add_argument("--weight_decay", type=float, default=defaults.get("weight_decay"),
                   help="on the 4-dim/'conv' parameter group" + ("" if step else
                                                                 " (default: step 1 5e-6, step 2 0)"))
    p.add_argument("--save", default=defaults.get("save"),
                   help="output folder" + ("" if step else " (default: step1/output or step2/output)"))
    p.add_argument("--teacher", default=recipe.COMMON["teacher"], help="torchvision model name")
    add_loader_flags(p)  # --batch_size, -j/--workers (the original's), --input-size, --data-backend
    # Additions.
    p.add_argument("--teacher-weights", default=None,
                   help="teacher state_dict file instead of torchvision's ImageNet weights")
    if step != 1:
        p.add_argument("--init-checkpoint", default=recipe.STEPS[2]["init_checkpoint"] if step else None,
                       help="step 2: the step-1 checkpoint to start from"
                            + ("" if step else " (default: step1/output/model_best.pth.tar)"))
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    p.add_argument("--optimizer", choices=("adam", "sgd", "adamw"), default="adam",
                   help="adam (the recipe; coupled L2 decay), sgd (momentum 0.9), adamw (decoupled decay)")
    p.add_argument("--print-freq", type=int, default=10, help="progress line every N iterations")
    p.add_argument("--analysis-every", type=int, default=0,
                   help="measure the paper's quantities (utils/analysis) every N iterations; 0 = off")
    add_device_flags(p)
    p.add_argument("--fast-decode", action="store_true",
                   help="decode training JPEGs at reduced size (utils.data.draft_loader); changes pixels")
    p.add_argument("--skip-bad-images", type=int, default=0, metavar="N",
                   help="skip up to N unreadable training images per epoch, each named in the log "
                        "(0: stop at the first)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms where they exist (and no cuDNN autotuning)")
    p.add_argument("--stop-after-epochs", type=int, default=None, metavar="N",
                   help="stop after N epochs of this launch (time-limited jobs); relaunch to resume")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse with the defaults of the step that `--step` names."""
    pre = Parser(add_help=False)
    pre.add_argument("--step", type=int, choices=(1, 2))
    step = pre.parse_known_args(argv)[0].step
    return get_parser(step).parse_args(argv)


def resolve_args(args, world_size: int | None = None) -> argparse.Namespace:
    """Fill the defaults that depend on the step, the optimizer and the machine, and check
    everything that can be checked before the data and the teacher are loaded (ConfigError, one
    line each). `world_size`: the number of processes (default: torchrun's WORLD_SIZE, else 1)."""
    step = recipe.STEPS[args.step]
    if args.learning_rate is None:
        args.learning_rate = recipe.LEARNING_RATE[args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = step["weight_decay"]
    args.save = os.path.abspath(args.save or step["save"])
    if args.step == 2 and getattr(args, "init_checkpoint", None) is None:
        args.init_checkpoint = step["init_checkpoint"]
    if not args.data:
        raise ConfigError("no data: pass --data DIR or set DATA (a folder with train/ and val/)")
    check_at_least(("--epochs", args.epochs, 1), ("--batch_size", args.batch_size, 1),
                   ("--print-freq", args.print_freq, 1))
    check_input_size(args.input_size)
    check_at_least(("-j/--workers", args.workers, 0), ("--analysis-every", args.analysis_every, 0),
                   ("--skip-bad-images", args.skip_bad_images, 0), ("--stop-after-epochs", args.stop_after_epochs, 1))
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be from 0 to {MAX_SEED}, got {args.seed}")
    if not (math.isfinite(args.learning_rate) and args.learning_rate >= 0):
        raise ConfigError(f"--learning_rate {args.learning_rate} must be a number, not negative (the "
                          f"recipe's is {recipe.LEARNING_RATE[args.optimizer]})")
    if not math.isfinite(args.weight_decay):
        raise ConfigError(f"--weight_decay {args.weight_decay} must be a number (the recipe's is "
                          f"{step['weight_decay']})")
    resolve_device_layout(args, torch.cuda.is_available())
    if args.fast_decode and args.data_backend != "pil":
        raise ConfigError("--fast-decode is a PIL decoding option: it needs --data-backend pil")
    check_data_backend(args.data_backend)
    world_size = world_size or int(os.environ.get("WORLD_SIZE", 1))
    check_batch_split(args.batch_size, world_size)
    if args.input_size < 64 and args.batch_size == world_size:
        raise ConfigError(f"--batch_size {args.batch_size} is one image per process: at --input-size "
                          f"{args.input_size} the last feature maps are 1x1, and BatchNorm cannot train on one "
                          f"value per channel; use at least {2 * world_size}")
    check_writable(args.save, "--save")
    return args


def schedule_warnings(args) -> list:
    """Settings that run but train nothing: said once at the start."""
    warnings = []
    if args.learning_rate == 0:
        warnings.append("--learning_rate 0: the weights will not change")
    if args.epochs == 1:
        warnings.append("--epochs 1: under the recipe's linear decay the only epoch trains at "
                        "learning rate 0, so the weights will not change (use 2 or more)")
    return warnings
