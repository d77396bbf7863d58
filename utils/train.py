"""Train ReActNet-A the AdamBNN way, either step: `python -m utils.train --step 1|2 [flags]`.

Launched by step1/run.sh and step2/run.sh under torchrun (one process per GPU, DDP); runs as a
single process without torchrun too. Relaunching the same command resumes from
<save>/checkpoint.pth.tar, mid-epoch after a preemption. Defaults are the published recipe
(utils/recipe.py).
"""
import argparse
import datetime
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models import reactnet_a

from . import recipe
from .checkpoint import (CheckpointError, check_finite, checkpoint_step, load_weights, read_checkpoint,
                         remove_stale_temporaries, save_checkpoint)
from .data import DataError, default_workers, to_device, train_loader, val_loader
from .distill import DistributionLoss
from .distributed import (all_gather, all_gather_object, all_reduce_max, barrier, broadcast_buffers,
                          broadcast_object, cleanup, get_rank, init_distributed)
from .engine import NonFiniteLoss, Progress, evaluate, train_one_epoch
from .logger import RunLogger, append_line, git_commit
from .preempt import StopRequest, exit_with_parent

PRECISIONS = ("fp32", "tf32", "bf16")

# A relaunch may change any flag but --step (read_resume) and --optimizer (restore), which the
# saved state belongs to, and these only at an epoch boundary (they fix the order of the epoch's
# samples).
EPOCH_ORDER_FLAGS = ("batch_size", "seed", "world_size", "train_images")


class ConfigError(ValueError):
    """A flag that cannot work, found before anything is loaded (utils/launch.py checks these
    before it starts any process)."""


class Stopped(Exception):
    """A stop signal ended the run after saving; `code` is the process's exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code

    @classmethod
    def by(cls, stop: StopRequest, where: str, save_dir: str) -> "Stopped":
        return cls(f"=> stopped by {stop.name} {where}: saved {save_dir}/checkpoint.pth.tar; relaunch "
                   "the same command to continue", stop.exit_code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it has none or its help already says it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def get_parser(step: int | None = None) -> argparse.ArgumentParser:
    """The flags, with `step`'s defaults when it is known (stepN/run.sh passes it)."""
    defaults = recipe.STEPS.get(step, {})
    p = argparse.ArgumentParser(
        description=f"AdamBNN step {step}: " + recipe.STEP_DESCRIPTIONS[step] if step else __doc__.split("\n")[0],
        formatter_class=HelpFormatter)
    p.add_argument("--step", type=int, choices=(1, 2), required=step is None, default=step,
                   help="1: binary activations, real weights; 2: binary weights and activations"
                   if step is None else argparse.SUPPRESS)
    # The original's flags, same names and meanings.
    p.add_argument("--data", default=os.environ.get("DATA"),
                   help="ImageFolder root with train/ and val/ (default: $DATA)")
    p.add_argument("--batch_size", type=int, default=recipe.COMMON["batch_size"],
                   help="global batch size, split evenly over the processes")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="initial learning rate (default: 1.25e-3 for adam and adamw, 0.1 for sgd)")
    p.add_argument("--epochs", type=int, default=recipe.COMMON["epochs"])
    p.add_argument("--weight_decay", type=float, default=defaults.get("weight_decay"),
                   help="on the 4-dim/'conv' parameter group" + ("" if step else
                                                                 " (default: step 1 5e-6, step 2 0)"))
    p.add_argument("--save", default=defaults.get("save"),
                   help="output folder" + ("" if step else " (default: step1/output or step2/output)"))
    p.add_argument("--teacher", default=recipe.COMMON["teacher"], help="torchvision model name")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="data-loading workers per process (default: the CPUs this process may use, "
                        "shared by the node's processes, at most 8)")
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
    p.add_argument("--input-size", type=int, default=recipe.COMMON["input_size"],
                   help="train crop size, a multiple of 32; validation resizes to size*256/224 and centre-crops")
    p.add_argument("--print-freq", type=int, default=10, help="progress line every N iterations")
    p.add_argument("--analysis-every", type=int, default=0,
                   help="measure the paper's quantities (utils/analysis) every N iterations; 0 = off")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32: true float32, TF32 off (the recipe's arithmetic, as on the authors' V100s); "
                        "tf32: float32 with TF32 matmuls and convolutions on CUDA; bf16: bf16 autocast "
                        "for student and teacher, the loss in float32")
    p.add_argument("--data-backend", choices=("pil", "torch"), default="pil",
                   help="pil: decode and augment in the loader workers (the original's transforms); "
                        "torch: workers read the bytes, this process decodes (nvjpeg on CUDA) and "
                        "augments batches on its device, the same parameters and pixels")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on with CUDA, off on CPU)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile student and teacher with BACKEND (default: inductor with CUDA, "
                        "off on CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="none",
                   help="do not compile")
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
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--step", type=int, choices=(1, 2))
    step = pre.parse_known_args(argv)[0].step
    return get_parser(step).parse_args(argv)


def resolve_args(args, world_size: int | None = None) -> argparse.Namespace:
    """Fill the defaults that depend on the step and the optimizer, and check everything that can
    be checked before the data and the teacher are loaded (ConfigError, one line each).
    `world_size`: the number of processes (default: torchrun's WORLD_SIZE, else 1)."""
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
    for flag in ("epochs", "batch_size", "print_freq", "input_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.input_size % 32:
        raise ConfigError(f"--input-size {args.input_size} is not a multiple of 32: ReActNet-A halves "
                          "the resolution five times (224 is the recipe's)")
    if not args.learning_rate >= 0:
        raise ConfigError(f"--learning_rate {args.learning_rate} must be positive (the recipe's is "
                          f"{recipe.LEARNING_RATE[args.optimizer]})")
    cuda = torch.cuda.is_available()
    if args.channels_last is None:
        args.channels_last = cuda
    if args.compile is None:
        args.compile = "inductor" if cuda else "none"
    if args.fast_decode and args.data_backend != "pil":
        raise ConfigError("--fast-decode is a PIL decoding option: it needs --data-backend pil")
    if args.skip_bad_images < 0:
        raise ConfigError("--skip-bad-images must be 0 or more")
    world_size = world_size or int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world_size:
        raise ConfigError(f"--batch_size {args.batch_size} (global) does not split evenly over "
                          f"{world_size} processes: use a multiple of {world_size}")
    check_writable(args.save)
    return args


def check_writable(folder: str) -> None:
    """`folder`, or the nearest parent that exists, must be a writable folder (nothing is created)."""
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--save {folder}: {existing} is not a folder this user can write to")


def set_precision(precision: str):
    """TF32 on CUDA only for 'tf32' (PyTorch's own default lets cuDNN convolutions use it)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


def autocast_dtype(precision: str):
    return torch.bfloat16 if precision == "bf16" else None


def schedule_warnings(args) -> list:
    """Settings that run but train nothing: said once at the start."""
    warnings = []
    if args.learning_rate == 0:
        warnings.append("--learning_rate 0: the weights will not change")
    if args.epochs == 1:
        warnings.append("--epochs 1: under the recipe's linear decay the only epoch trains at "
                        "learning rate 0, so the weights will not change (use 2 or more)")
    return warnings


def build_teacher(name, weights_path, num_classes, log):
    """Frozen torchvision teacher in eval mode: `weights_path` or torchvision's ImageNet weights
    (IMAGENET1K_V1 where the model has them), fetched once by rank 0 while the others wait."""
    import torchvision
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise SystemExit(f"error: --teacher {name!r} is not a torchvision model") from None
    if weights_path:
        obj = read_checkpoint(weights_path)
        state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj
        state = {k.removeprefix("module."): v for k, v in state.items()}
        classifiers = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
        teacher_classes = classifiers[-1].shape[0] if classifiers else num_classes
        source = weights_path
    else:
        enum = torchvision.models.get_model_weights(name)
        weights = getattr(enum, "IMAGENET1K_V1", None) or enum.DEFAULT
        teacher_classes = len(weights.meta["categories"])
        source = f"torchvision {weights}"
    if teacher_classes != num_classes:
        raise SystemExit(
            f"error: the teacher ({source}) has {teacher_classes} classes but the data has "
            f"{num_classes}: pass --teacher-weights with a {num_classes}-class {name}")
    if not weights_path:
        url = weights.url
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        failure = None
        if get_rank() == 0:  # rank 0 downloads, the others wait
            try:
                weights.get_state_dict(progress=False, check_hash=True)
            except Exception as e:  # offline, proxy, disk full, bad hash...
                failure = f"{type(e).__name__}: {e}"
        failure = broadcast_object(failure)
        if failure:
            raise SystemExit(
                f"error: could not fetch the teacher's weights {url} ({failure}). Offline, put "
                f"the file at {cached} (TORCH_HOME/hub/checkpoints/) or pass --teacher-weights PATH")
        state = weights.get_state_dict(progress=False, check_hash=True)
    teacher = builder(num_classes=teacher_classes)
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise SystemExit(f"error: {source} does not fit torchvision {name}: {' '.join(first[:3])}")
    log(f"=> teacher {name} from {source}")
    return teacher.eval().requires_grad_(False)


def load_init(student, path, log):
    """Step 2 starts from step 1's best model, loaded strictly."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: step 2 starts from a step-1 checkpoint and {path} does not exist: "
                         "run step 1 first (bash step1/run.sh) or pass --init-checkpoint PATH")
    obj = read_checkpoint(path)
    if checkpoint_step(obj) == 2:
        raise SystemExit(f"error: {path} is a step-2 checkpoint; step 2 starts from step 1's "
                         "model_best.pth.tar (pass it with --init-checkpoint)")
    fmt = load_weights(student, obj)
    check_finite(student.state_dict(), path)
    epoch = f", epoch {obj['epoch']}, best val Acc@1 {obj.get('best_top1_acc', float('nan')):.3f}" \
        if isinstance(obj, dict) and "epoch" in obj else ""
    log(f"=> step 2 starts from {path} ({fmt}{epoch})")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Run:
    """Everything a training run holds between its set-up and its end."""
    args: argparse.Namespace
    info: object
    logger: RunLogger
    train_data: object
    prepare_train: object     # the data backend's batch -> utils.data.Batch on the device
    val_data: object
    prepare_val: object
    teacher: nn.Module
    student: nn.Module        # unwrapped: what is saved
    model: nn.Module          # what trains: DDP and/or compiled
    eager_model: nn.Module    # DDP, uncompiled: the analysis's measured iterations
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    monitor: object = None
    start_epoch: int = 0
    progress: Progress = field(default_factory=Progress)
    best_top1: float = -1.0
    commit: str = ""

    def log(self, msg: str):
        self.logger.log(msg)


def build_data(args, info, log):
    """(train loader, its prepare), (val loader, its prepare) of --data-backend."""
    batch = args.batch_size // info.world_size
    workers = args.workers if args.workers is not None else default_workers(info.local_world_size)
    common = dict(world_size=info.world_size, rank=info.rank, pin_memory=info.device.type == "cuda",
                  input_size=args.input_size)
    augment = dict(seed=args.seed, crop_scale=recipe.COMMON["crop_scale"], lighting=recipe.COMMON["lighting"])
    if args.data_backend == "torch":
        from .torch_data import torch_train_loader, torch_val_loader
        train = torch_train_loader(args.data, batch, workers, **common, **augment)
        val = torch_val_loader(args.data, batch, workers, **common)
    else:
        train = train_loader(args.data, batch, workers, **common, **augment, fast_decode=args.fast_decode), to_device
        val = val_loader(args.data, batch, workers, **common), to_device
    classes, val_classes = train[0].dataset.classes, val[0].dataset.classes
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(classes))[:5]
        raise DataError(f"train/ and val/ of {args.data} have different class folders ({len(classes)} "
                        f"and {len(val_classes)}): only in train/: {only_train or 'none'}, only in val/: "
                        f"{only_val or 'none'} (the first of each); both need the same <class> folders")
    log(f"=> data {args.data}: {len(train[0].dataset)} train, {len(val[0].dataset)} val images, "
        f"{len(classes)} classes; {info.world_size} process(es) x batch {batch}, {workers} workers each; "
        f"--data-backend {args.data_backend}")
    return train, val


def setup(args) -> Run:
    """Data, teacher, student, optimizer, resume: the run as the flags and --save describe it."""
    info = init_distributed()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: stop with the launcher
        exit_with_parent()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # CUDA pooling backward: warns
    torch.backends.cudnn.benchmark = not args.deterministic
    set_precision(args.precision)
    logger = RunLogger(args.save, enabled=info.is_main)
    log = logger.log
    if info.is_main:
        for name in remove_stale_temporaries(args.save):
            log(f"=> removed {name}, left by a save that was killed")
    for warning in schedule_warnings(args):
        log(f"=> warning: {warning}")
    train_data, val_data = build_data(args, info, log)
    num_classes = len(train_data[0].dataset.classes)
    teacher = build_teacher(args.teacher, args.teacher_weights, num_classes, log)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    student = reactnet_a(binary_weights=recipe.STEPS[args.step]["binary_weights"], num_classes=num_classes)
    resume = read_resume(args)
    # Step 2 starts from step 1; a resumed run needs that only as the analysis's C2I reference.
    need_init = args.step == 2 and (resume is None or (args.analysis_every and
                                                       os.path.isfile(args.init_checkpoint)))
    if need_init:
        load_init(student, args.init_checkpoint, log)
    reference = None
    if args.analysis_every and (resume is None or args.step == 1 or need_init):
        reference = {k: v.clone() for k, v in student.state_dict().items() if v.ndim == 4}
    elif args.analysis_every:
        log(f"=> {args.init_checkpoint} is gone: C2I is measured against the resumed weights")
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    student.to(info.device, memory_format=memory_format)
    teacher.to(info.device, memory_format=memory_format)
    optimizer = recipe.build_optimizer(student, args.optimizer, args.learning_rate, args.weight_decay)
    eager = student if info.world_size == 1 else nn.parallel.DistributedDataParallel(
        student, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    compiled = (lambda m: m) if args.compile == "none" else (lambda m: torch.compile(m, backend=args.compile))
    log(f"=> --precision {args.precision}, channels_last {'on' if args.channels_last else 'off'}, "
        f"compile {args.compile}")
    run = Run(args, info, logger, *train_data, *val_data, compiled(teacher), student, compiled(eager),
              eager, compiled(student), optimizer, recipe.build_scheduler(optimizer, args.epochs),
              commit=git_commit())
    if resume is not None:
        restore(run, resume)
    if args.analysis_every:
        from .analysis import TrainingMonitor
        run.monitor = TrainingMonitor(student, optimizer, args.analysis_every, reference=reference)
    return run


def read_resume(args):
    """This run's own checkpoint, if --save has one. Rank 0's file decides; every process must see
    the same one (same size, epoch and position), or all stop: --save is not shared."""
    path = os.path.join(args.save, "checkpoint.pth.tar")
    ckpt, error, view = None, None, None
    if os.path.isfile(path):
        try:
            ckpt = read_checkpoint(path)
            view = (os.path.getsize(path), ckpt.get("epoch"), ckpt.get("iteration", 0))
        except CheckpointError as e:
            error, view = e, "unreadable"
    views = all_gather_object(view)
    differ = [rank for rank, v in enumerate(views) if v != views[0]]
    if differ:
        raise SystemExit(f"error: process(es) {differ} see {path} differently from rank 0 (rank 0: "
                         f"{views[0] or 'no file'}; here: {view or 'no file'}): --save must be a "
                         "folder on a filesystem that every node shares")
    if error is not None:
        raise error
    if ckpt is not None and checkpoint_step(ckpt) != args.step:
        raise SystemExit(f"error: {path} is a step-{checkpoint_step(ckpt)} checkpoint, this is step "
                         f"{args.step}: pass another --save")
    return ckpt


def restore(run: Run, ckpt: dict):
    """Continue the saved run: weights, optimizer, RNG, position; then the flags of this launch.

    A changed flag is applied from here on (--epochs, --learning_rate and --weight_decay give the
    schedule that the new values define from the current epoch on), except --optimizer, refused,
    and EPOCH_ORDER_FLAGS, refused in the middle of an epoch (another --step: read_resume)."""
    args, path = run.args, os.path.join(run.args.save, "checkpoint.pth.tar")
    saved = {**ckpt["args"], "world_size": ckpt.get("world_size"), "train_images": ckpt.get("train_images")}
    now = {**vars(args), "world_size": run.info.world_size, "train_images": len(run.train_data.dataset)}
    optimizer = saved.get("optimizer", "adam")  # checkpoints from before --optimizer: adam
    if optimizer != args.optimizer:
        raise SystemExit(f"error: {path} was trained with --optimizer {optimizer}, not "
                         f"{args.optimizer}: pass another --save to start a new run")
    iteration = ckpt.get("iteration", 0)
    if iteration:
        changed = [f"{k} {saved[k]} -> {now[k]}" for k in EPOCH_ORDER_FLAGS
                   if saved.get(k) is not None and saved[k] != now[k]]
        if changed:
            raise SystemExit(f"error: {path} stopped in the middle of epoch {ckpt['epoch']}, whose sample "
                             f"order depends on what changed ({', '.join(changed)}): relaunch with the "
                             "old values to finish the epoch, then change them")
        state = ckpt["progress"]
        row = state["sums"][run.info.rank].to(run.info.device)  # this process's running sums
        run.progress = Progress(iteration, row[:3].float(), int(row[3]), state["time"])
    load_weights(run.student, ckpt)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    recipe.apply_schedule(run.optimizer, run.scheduler, args.learning_rate, args.weight_decay, args.epochs)
    set_rng_state(ckpt["rng"])
    run.start_epoch, run.best_top1 = ckpt["epoch"], ckpt["best_top1_acc"]
    changed = [f"--{k} {saved.get(k)} -> {v}" for k, v in now.items()
               if k in ckpt["args"] and saved[k] != v]
    where = f" and {iteration} iterations of epoch {run.start_epoch}" if iteration else ""
    run.log(f"=> resuming from {path}: {run.start_epoch} epochs{where} done, best val Acc@1 "
            f"{run.best_top1:.3f}" + (f"; changed, applied from now on: {', '.join(changed)}" if changed else ""))


def save(run: Run, epochs_done: int, is_best: bool = False, progress: Progress | None = None):
    """Write checkpoint.pth.tar (and model_best.pth.tar when `is_best`) on rank 0, atomically;
    collective. `progress`: the position in epoch `epochs_done`, for a mid-epoch checkpoint."""
    state = None
    if progress is not None:  # every process's running sums, so that each continues its own
        sums = torch.cat([progress.sums.double(), progress.sums.new_tensor([progress.count]).double()])
        state = {"sums": all_gather(sums).cpu(), "time": progress.time}
    check_finite(run.student.state_dict(), "the weights to be saved")
    if run.info.is_main:
        save_checkpoint({
            "epoch": epochs_done, "iteration": progress.iteration if progress else 0, "progress": state,
            "step": run.args.step, "arch": "reactnet_a", "state_dict": run.student.state_dict(),
            "best_top1_acc": run.best_top1, "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "args": vars(run.args), "rng": rng_state(),
            "git_commit": run.commit, "world_size": run.info.world_size,
            "train_images": len(run.train_data.dataset),
        }, run.args.save, is_best)
    barrier()


def train_epoch(run: Run, epoch: int, stop) -> object:
    args = run.args
    run.train_data.sampler.set_epoch(epoch, start=run.progress.iteration * run.train_data.batch_size)
    stats = train_one_epoch(
        run.model, run.teacher, run.train_data, DistributionLoss(), run.optimizer, epoch, run.info.device,
        prepare=run.prepare_train, progress=run.progress, stop=stop, max_skipped=args.skip_bad_images,
        autocast_dtype=autocast_dtype(args.precision), channels_last=args.channels_last,
        monitor=run.monitor, eager_model=run.eager_model, print_freq=args.print_freq, log=run.log,
        world_size=run.info.world_size)
    for path, reason in stats.skipped:
        run.log(f"=> skipped unreadable training image {path} ({reason})")
    if hasattr(run.prepare_train, "take_counts"):
        counts = run.prepare_train.take_counts()
        if counts["cpu_decoded"]:
            run.log(f"=> {counts['cpu_decoded']} of {counts['decoded']} training images were not "
                    "nvjpeg-decodable (CMYK, grayscale, not JPEG) and were decoded on the CPU")
    return stats


def validate(run: Run, epoch: int):
    """Validation after epoch `epoch`; an unreadable image stops the run, the epoch saved first."""
    broadcast_buffers(run.student)  # every rank validates, and the checkpoint holds, rank 0's BN stats
    try:
        return evaluate(run.eval_model, run.val_data, run.info.device, prepare=run.prepare_val,
                        autocast_dtype=autocast_dtype(run.args.precision), channels_last=run.args.channels_last)
    except DataError as e:
        save(run, epoch + 1)
        raise DataError(f"{e}; epoch {epoch} was trained and saved, not validated: relaunch once "
                        "the file is fixed") from None


def end_epoch(run: Run, epoch: int, lr: float, tr, va, eta: float):
    """The epoch's log (console, log.txt, log.jsonl, TensorBoard), then its checkpoint: a resumed
    run drops records past its checkpoint."""
    is_best = va.top1 > run.best_top1
    run.best_top1 = max(run.best_top1, va.top1)
    analysis = run.monitor.epoch_metrics() if run.monitor is not None else {}
    run.logger.log_epoch(
        f"* Acc@1 {va.top1:.3f} Acc@5 {va.top5:.3f} (val loss {va.loss:.4f}, {va.count} images; best "
        f"Acc@1 {run.best_top1:.3f}; train {tr.images_per_s:.1f} img/s; ETA {datetime.timedelta(seconds=round(eta))})",
        {"epoch": epoch, "lr": lr, "train_loss": tr.loss, "train_top1": tr.top1,
         "train_top5": tr.top5, "val_loss": va.loss, "val_top1": va.top1, "val_top5": va.top5,
         "val_images": va.count, "best_top1": run.best_top1, "images_per_s": tr.images_per_s,
         "epoch_time": tr.time}, analysis)
    save(run, epoch + 1, is_best)


def stop_requested(stop, device) -> bool:
    """Whether any process has received a stop signal (collective)."""
    return bool(all_reduce_max(torch.tensor([int(stop())], device=device)).item())


def train(args) -> nn.Module:
    """Run (or resume) the training `args` describe; returns the trained student (unwrapped)."""
    run = setup(args)
    if run.start_epoch >= args.epochs:
        run.log(f"=> nothing to do: {run.start_epoch} epochs already done in {args.save} (--epochs {args.epochs})")
        return run.student
    run.logger.open()
    run.logger.truncate_records(run.start_epoch)
    run.logger.save_args(vars(args), git_commit=run.commit, world_size=run.info.world_size,
                         torch=torch.__version__)
    last = args.epochs if args.stop_after_epochs is None else min(args.epochs, run.start_epoch + args.stop_after_epochs)
    started = time.perf_counter()
    with StopRequest() as stop:
        for epoch in range(run.start_epoch, last):
            lr = run.optimizer.param_groups[0]["lr"]
            run.log(f"=> epoch {epoch}/{args.epochs}: learning_rate {lr:.6e}")
            tr = train_epoch(run, epoch, stop)
            if tr.stopped_at is not None:
                save(run, epoch, progress=run.progress)
                raise Stopped.by(stop, f"in epoch {epoch} after iteration {tr.stopped_at}", args.save)
            run.progress = Progress()
            run.scheduler.step()
            va = validate(run, epoch)
            eta = (time.perf_counter() - started) / (epoch + 1 - run.start_epoch) * (args.epochs - epoch - 1)
            end_epoch(run, epoch, lr, tr, va, eta)
            if epoch + 1 < last and stop_requested(stop, run.info.device):
                raise Stopped.by(stop, f"after epoch {epoch}", args.save)
    if run.monitor is not None:
        run.monitor.close()
    if last < args.epochs:
        run.log(f"=> stopped after epoch {last} of {args.epochs} (--stop-after-epochs); relaunch to resume")
    else:
        run.log(f"=> done: best val Acc@1 {run.best_top1:.3f}, model in {os.path.join(args.save, 'model_best.pth.tar')}")
    run.logger.close()
    return run.student


def report(msg: str, save_dir: str | None):
    """An error line from the process that raised it: on stderr (prefixed with the rank when there
    are several processes) and in <save>/log.txt when that exists."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        msg = f"[rank {get_rank()}/{world_size}] {msg}"
    print(msg, file=sys.stderr, flush=True)
    if save_dir and os.path.isdir(save_dir):
        append_line(os.path.join(save_dir, "log.txt"), msg)


def main(argv=None):
    args = parse_args(argv)
    try:
        train(resolve_args(args))
    except Stopped as e:
        if get_rank() == 0:
            report(str(e), args.save)
        sys.exit(e.code)
    except (CheckpointError, ConfigError, DataError, NonFiniteLoss, SystemExit) as e:
        msg = e.code if isinstance(e, SystemExit) else f"error: {e}"
        if not isinstance(msg, str):
            raise
        report(msg, args.save)
        sys.exit(1)
    except BaseException:  # a bug or an unexpected failure: its traceback, in log.txt too
        if os.path.isdir(args.save or ""):
            append_line(os.path.join(args.save, "log.txt"), traceback.format_exc().rstrip())
        raise
    cleanup()


if __name__ == "__main__":
    main()
