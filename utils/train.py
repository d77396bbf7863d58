"""Train ReActNet-A the AdamBNN way, either step: `python -m utils.train --step 1|2 [flags]`.

Launched by step1/run.sh and step2/run.sh under torchrun (one process per GPU, DDP); runs as a
single process without torchrun too. Relaunching the same command resumes from
<save>/checkpoint.pth.tar. Defaults are the published recipe (utils/recipe.py).
"""
import argparse
import datetime
import os
import sys
import time

import torch
import torch.nn as nn

from models import reactnet_a

from . import recipe
from .checkpoint import CheckpointError, checkpoint_step, load_weights, read_checkpoint, save_checkpoint
from .data import DataError, train_loader, val_loader
from .distill import DistributionLoss
from .distributed import (barrier, broadcast_buffers, broadcast_object, cleanup, get_rank,
                          init_distributed)
from .engine import evaluate, train_one_epoch
from .logger import RunLogger, git_commit


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--step", type=int, choices=(1, 2), required=True,
                   help="1: binary activations, real weights; 2: binary weights and activations")
    # The original's flags, same names and meanings.
    p.add_argument("--data", default=os.environ.get("DATA"),
                   help="ImageFolder root with train/ and val/ (default: $DATA)")
    p.add_argument("--batch_size", type=int, default=recipe.COMMON["batch_size"],
                   help="global batch size, split evenly over the processes")
    p.add_argument("--learning_rate", type=float, default=None,
                   help=f"default by optimizer: {recipe.LEARNING_RATE}")
    p.add_argument("--epochs", type=int, default=recipe.COMMON["epochs"])
    p.add_argument("--weight_decay", type=float, default=None,
                   help="on the 4-dim/'conv' parameter group (default: step 1 5e-6, step 2 0)")
    p.add_argument("--save", default=None,
                   help="output folder (default: step1/output or step2/output in the repository)")
    p.add_argument("--teacher", default=recipe.COMMON["teacher"], help="torchvision model name")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="data-loading workers per process (default: min(8, CPUs per process))")
    # Additions.
    p.add_argument("--teacher-weights", default=None,
                   help="teacher state_dict file instead of torchvision's ImageNet weights")
    p.add_argument("--init-checkpoint", default=None,
                   help="step 2: step-1 checkpoint to start from (default: step1/output/model_best.pth.tar)")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    p.add_argument("--optimizer", choices=("adam", "sgd", "adamw"), default="adam",
                   help="adam (the recipe; coupled L2 decay), sgd (momentum 0.9), adamw (decoupled decay)")
    p.add_argument("--input-size", type=int, default=recipe.COMMON["input_size"],
                   help="train crop size; validation resizes to size*256/224 and centre-crops")
    p.add_argument("--print-freq", type=int, default=10, help="progress line every N iterations")
    p.add_argument("--analysis-every", type=int, default=0,
                   help="measure the paper's quantities (utils/analysis) every N iterations; 0 = off")
    p.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="bf16 autocast for student and teacher (loss in float32)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the student (backend: inductor unless given)")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode training JPEGs at reduced size (utils.data.draft_loader); changes pixels")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms where they exist (and no cuDNN autotuning)")
    p.add_argument("--stop-after-epochs", type=int, default=None, metavar="N",
                   help="stop after N epochs of this launch (time-limited jobs); relaunch to resume")
    return p


def resolve_args(args):
    """Fill the defaults that depend on the step and the optimizer; check the flags."""
    step = recipe.STEPS[args.step]
    if args.learning_rate is None:
        args.learning_rate = recipe.LEARNING_RATE[args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = step["weight_decay"]
    args.save = os.path.abspath(args.save or step["save"])
    if args.step == 2 and args.init_checkpoint is None:
        args.init_checkpoint = step["init_checkpoint"]
    if not args.data:
        raise SystemExit("error: no data: pass --data DIR or set DATA (a folder with train/ and val/)")
    if min(args.epochs, args.batch_size, args.print_freq, args.input_size) < 1:
        raise SystemExit("error: --epochs, --batch_size, --print-freq and --input-size must be positive")
    return args


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


def train(args) -> nn.Module:
    """Run (or resume) the training of `args`; returns the trained student (unwrapped)."""
    info = init_distributed()
    device = info.device
    if args.batch_size % info.world_size:
        raise SystemExit(f"error: --batch_size {args.batch_size} (global) does not split evenly over "
                         f"{info.world_size} processes: use a multiple of {info.world_size}")
    batch = args.batch_size // info.world_size
    workers = args.workers if args.workers is not None else \
        min(8, max(1, (os.cpu_count() or 1) // info.local_world_size))
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # CUDA pooling backward: warns
    torch.backends.cudnn.benchmark = not args.deterministic
    autocast_dtype = torch.bfloat16 if args.amp == "bf16" else None

    # Data (checked first: a bad folder stops the run before anything is written)
    pin = device.type == "cuda"
    train_dl = train_loader(args.data, batch, workers, info.world_size, info.rank, args.seed, pin,
                            args.input_size, recipe.COMMON["crop_scale"], recipe.COMMON["lighting"],
                            args.fast_decode)
    val_dl = val_loader(args.data, batch, workers, info.world_size, info.rank, pin, args.input_size)
    classes = train_dl.dataset.classes
    if val_dl.dataset.classes != classes:
        raise SystemExit(f"error: train/ and val/ of {args.data} have different class folders "
                         f"({len(classes)} and {len(val_dl.dataset.classes)})")
    logger = RunLogger(args.save, enabled=info.is_main)
    log = logger.log
    log(f"=> data {args.data}: {len(train_dl.dataset)} train, {len(val_dl.dataset)} val images, "
        f"{len(classes)} classes; {info.world_size} process(es) x batch {batch}, {workers} workers each")

    # Models: the teacher, then the student (seeded alike on every rank)
    teacher = build_teacher(args.teacher, args.teacher_weights, len(classes), log).to(device)
    torch.manual_seed(args.seed)
    student = reactnet_a(binary_weights=recipe.STEPS[args.step]["binary_weights"],
                         num_classes=len(classes))
    resume_path = os.path.join(args.save, "checkpoint.pth.tar")
    resume = read_checkpoint(resume_path) if os.path.isfile(resume_path) else None
    if resume is not None and checkpoint_step(resume) != args.step:
        raise SystemExit(f"error: {resume_path} is a step-{checkpoint_step(resume)} checkpoint, this "
                         f"is step {args.step}: pass another --save")
    # Step 2 starts from step 1; a resumed run needs that only as the analysis's C2I reference.
    need_init = args.step == 2 and (resume is None or (args.analysis_every > 0 and
                                                       os.path.isfile(args.init_checkpoint)))
    if need_init:
        load_init(student, args.init_checkpoint, log)
    reference = None
    if args.analysis_every > 0 and (resume is None or args.step == 1 or need_init):
        reference = {k: v.clone() for k, v in student.state_dict().items() if v.ndim == 4}
    elif args.analysis_every > 0:
        log(f"=> {args.init_checkpoint} is gone: C2I is measured against the resumed weights")
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    student.to(device, memory_format=memory_format)
    teacher.to(memory_format=memory_format)
    optimizer = recipe.build_optimizer(student, args.optimizer, args.learning_rate, args.weight_decay)
    scheduler = recipe.build_scheduler(optimizer, args.epochs)

    start_epoch, best_top1 = 0, -1.0
    if resume is not None:
        if resume["args"].get("optimizer", "adam") != args.optimizer:
            raise SystemExit(f"error: {resume_path} was trained with --optimizer "
                             f"{resume['args'].get('optimizer')}, not {args.optimizer}: pass another --save")
        load_weights(student, resume)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        start_epoch, best_top1 = resume["epoch"], resume["best_top1_acc"]
        changed = [f"--{k} {resume['args'].get(k)} -> {getattr(args, k)}" for k in
                   ("epochs", "batch_size", "learning_rate", "weight_decay", "seed", "data")
                   if resume["args"].get(k) != getattr(args, k)]
        log(f"=> resuming from {resume_path}: {start_epoch} epochs done, best val Acc@1 {best_top1:.3f}"
            + (f" (changed: {', '.join(changed)})" if changed else ""))
        del resume
    if start_epoch >= args.epochs:
        log(f"=> nothing to do: {args.epochs} epochs already done in {args.save}")
        logger.close()
        return student

    logger.open()
    logger.truncate_records(start_epoch)
    commit = git_commit()
    logger.save_args(vars(args), git_commit=commit, world_size=info.world_size,
                     torch=torch.__version__)
    model = student
    if info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = torch.compile(model, backend=args.compile) if args.compile else model
    eval_model = torch.compile(student, backend=args.compile) if args.compile else student
    monitor = None
    if args.analysis_every > 0:
        from .analysis import TrainingMonitor
        monitor = TrainingMonitor(student, optimizer, args.analysis_every, reference=reference)
    criterion = DistributionLoss()
    kw = dict(autocast_dtype=autocast_dtype, channels_last=args.channels_last)

    stop = args.epochs if args.stop_after_epochs is None else \
        min(args.epochs, start_epoch + args.stop_after_epochs)
    run_start = time.perf_counter()
    for epoch in range(start_epoch, stop):
        lr = optimizer.param_groups[0]["lr"]
        log(f"=> epoch {epoch}/{args.epochs}: learning_rate {lr:.6e}")
        train_dl.sampler.set_epoch(epoch)
        tr = train_one_epoch(train_model, teacher, train_dl, criterion, optimizer, epoch, device,
                             monitor=monitor, print_freq=args.print_freq, log=log,
                             world_size=info.world_size, **kw)
        scheduler.step()
        broadcast_buffers(student)  # every rank validates and the checkpoint holds rank 0's BN stats
        va = evaluate(eval_model, val_dl, device, **kw)
        is_best = va["top1"] > best_top1
        best_top1 = max(best_top1, va["top1"])
        analysis = monitor.epoch_metrics() if monitor is not None else {}
        done = epoch + 1 - start_epoch
        eta = (time.perf_counter() - run_start) / done * (args.epochs - epoch - 1)
        log(f"* Acc@1 {va['top1']:.3f} Acc@5 {va['top5']:.3f} (val loss {va['loss']:.4f}, "
            f"{va['count']} images; best Acc@1 {best_top1:.3f}; train {tr['images_per_s']:.1f} img/s; "
            f"ETA {datetime.timedelta(seconds=round(eta))})")
        logger.scalars("train", {"loss": tr["loss"], "acc1": tr["top1"], "acc5": tr["top5"],
                                 "lr": lr, "images_per_s": tr["images_per_s"]}, epoch)
        logger.scalars("val", {"loss": va["loss"], "acc1": va["top1"], "acc5": va["top5"]}, epoch)
        logger.scalars("analysis", analysis, epoch)
        # The epoch's record, then its checkpoint: a resumed run drops records past its checkpoint.
        logger.epoch_record({
            "epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_top1": tr["top1"],
            "train_top5": tr["top5"], "val_loss": va["loss"], "val_top1": va["top1"],
            "val_top5": va["top5"], "val_images": va["count"], "best_top1": best_top1,
            "images_per_s": tr["images_per_s"], "epoch_time": tr["time"], **analysis})
        if info.is_main:
            save_checkpoint({
                "epoch": epoch + 1, "step": args.step, "arch": "reactnet_a",
                "state_dict": student.state_dict(), "best_top1_acc": best_top1,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "args": vars(args), "rng": rng_state(), "git_commit": commit,
            }, args.save, is_best)
        barrier()
    if monitor is not None:
        monitor.close()
    if stop < args.epochs:
        log(f"=> stopped after epoch {stop} of {args.epochs} (--stop-after-epochs); relaunch to resume")
    else:
        log(f"=> done: best val Acc@1 {best_top1:.3f}, model in {os.path.join(args.save, 'model_best.pth.tar')}")
    logger.close()
    return student


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        train(resolve_args(args))
    except (CheckpointError, DataError, SystemExit) as e:
        msg = e.code if isinstance(e, SystemExit) else f"error: {e}"
        if not isinstance(msg, str):
            raise
        if get_rank() == 0:  # one message, from rank 0
            print(msg, file=sys.stderr)
        sys.exit(1)
    cleanup()


if __name__ == "__main__":
    main()
