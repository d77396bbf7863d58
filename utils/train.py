"""Train ReActNet-A the AdamBNN way, either step: `python -m utils.train --step 1|2 [flags]`.

step1/run.sh and step2/run.sh run it under torchrun (utils/launch.py: one process per GPU, DDP);
it runs as a single process without torchrun too. `main()` parses the flags and turns errors
into one-line messages; `train()` holds the stop-signal handler, the process group and the run's
folder; `_train()` builds the run's parts as named locals -- data, teacher, student, optimizer,
resume, scheduler -- then runs the epoch loop. The flags and their checks are in utils/config.py,
the published defaults in utils/recipe.py, the loops in utils/engine.py, the resume and save
policy in utils/run_folder.py. Relaunching the same command resumes from
<save>/checkpoint.pth.tar, mid-epoch after a stop signal.
"""
import datetime
import os
import time

import torch
import torch.nn as nn

from models import reactnet_a

from . import recipe
from .cli import exit_on_error, flag_names
from .config import get_parser, parse_args, resolve_args, schedule_warnings
from .data import check_same_classes
from .distill import DistributionLoss, build_teacher
from .distributed import broadcast_buffers, cleanup, init_distributed
from .engine import LoopSettings, evaluate, signalled, train_one_epoch
from .errors import DataError
from .loaders import build_loader
from .logger import RunLogger, git_commit
from .precision import compiled, memory_format, set_precision
from .preempt import Stopped, StopRequest, exit_with_parent, survive_lost_console
from .run_folder import (CheckpointSaver, Progress, TrainState, format_top1, init_checkpoint_file,
                         load_init_checkpoint)

__all__ = ["main", "train"]


def main(argv=None):
    survive_lost_console()  # a closed terminal's SIGHUP stops the run like SIGTERM: it must live to save
    args = parse_args(argv)
    with exit_on_error(args.save):
        train(resolve_args(args))
        cleanup()


def train(args) -> nn.Module:
    """Run (or resume) the training `args` describe (resolved by utils.config.resolve_args);
    returns the trained student, unwrapped. A stop signal from the first second on saves what
    there is to save and raises Stopped (exit code 75, or 130 for SIGINT)."""
    with StopRequest() as stop:
        info = init_distributed()
        if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: stop with the launcher
            exit_with_parent()
        logger = RunLogger(args.save, enabled=info.is_main)
        saver = CheckpointSaver(args.save, info, logger.log)
        try:
            return _train(args, info, logger, saver, stop)
        finally:
            saver.close()
            logger.close()


def _train(args, info, logger, saver, stop) -> nn.Module:
    log, device = logger.log, info.device
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # CUDA pooling backward: warns
    torch.backends.cudnn.benchmark = not args.deterministic
    set_precision(args.precision)
    for warning in schedule_warnings(args):
        log(f"=> warning: {warning}")
    resume = saver.read_resume(args.step)  # a --save that cannot be resumed is refused before anything loads

    data = dict(workers=args.workers, input_size=args.input_size, log=log)
    train_loader, prepare_train = build_loader("train", args.data_backend, args.data, args.batch_size, info,
                                               seed=args.seed, fast_decode=args.fast_decode, **data)
    val_loader, prepare_val = build_loader("val", args.data_backend, args.data, args.batch_size, info, **data)
    classes = check_same_classes(train_loader.dataset, val_loader.dataset, args.data)
    log(f"=> data {args.data}: {len(train_loader.dataset)} train, {len(val_loader.dataset)} val images, "
        f"{len(classes)} classes; {info.world_size} process(es) x batch {args.batch_size // info.world_size}, "
        f"{train_loader.num_workers} workers each; --data-backend {args.data_backend}")
    if signalled(stop, device):
        raise Stopped.during_start_up(stop)
    teacher = build_teacher(args.teacher, args.teacher_weights, len(classes), log)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    student = reactnet_a(binary_weights=recipe.STEPS[args.step]["binary_weights"], num_classes=len(classes))
    optimizer = recipe.build_optimizer(student, args.optimizer, args.learning_rate, args.weight_decay)
    state = TrainState(init_seed=args.seed)
    if args.step == 2:
        args.init_checkpoint = init_checkpoint_file(args.init_checkpoint, log)
    if resume is None and args.step == 2:
        load_init_checkpoint(student, args.init_checkpoint, log)
    elif resume is not None:
        state, notes = saver.restore(resume, args, student, optimizer, len(train_loader.dataset),
                                     flag_names(get_parser(args.step)))
        where = f" and {state.progress.iteration} iterations of epoch {state.epoch}" if state.progress.iteration else ""
        if state.unvalidated is not None:
            notes.append(f"epoch {state.epoch - 1} is trained but not validated: validating it first")
        log(f"=> resuming from {saver.path}: {state.epoch} epochs{where} done, best val Acc@1 "
            f"{format_top1(state.best_top1)}" + "".join(f"; {note}" for note in notes))
    if signalled(stop, device):
        raise Stopped.during_start_up(stop)
    if state.epoch >= args.epochs and state.unvalidated is None:
        log(f"=> nothing to do: {state.epoch} epochs already done in {args.save} (--epochs {args.epochs})")
        return student
    scheduler = recipe.build_scheduler(optimizer, args.learning_rate, args.epochs, epochs_done=state.epoch)
    monitor = None
    if args.analysis_every:
        from .analysis import TrainingMonitor, c2i_reference
        reference = c2i_reference(args, state, student, len(classes), log)
        monitor = TrainingMonitor(student, optimizer, args.analysis_every, reference=reference)

    student.to(device, memory_format=memory_format(args.channels_last))
    teacher.to(device, memory_format=memory_format(args.channels_last))
    # student: what is saved; ddp: what trains, uncompiled (the analysis's measured iterations);
    # model: what trains; eval_model: what validates (every process validates its own shard).
    ddp = student if info.world_size == 1 else nn.parallel.DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None)
    model, eval_model, teacher = (compiled(m, args.compile) for m in (ddp, student, teacher))
    loop = LoopSettings(device=device, precision=args.precision, channels_last=args.channels_last,
                        print_freq=args.print_freq, log=log, world_size=info.world_size,
                        max_skipped=args.skip_bad_images, stop=stop)
    log(f"=> --precision {args.precision}, channels_last {'on' if args.channels_last else 'off'}, "
        f"compile {args.compile}")

    logger.open()
    logger.truncate_records(state.epoch - 1 if state.unvalidated is not None else state.epoch)  # the validated
    commit = git_commit()
    logger.save_args(vars(args), git_commit=commit, world_size=info.world_size, torch=torch.__version__)
    record = {"step": args.step, "arch": "reactnet_a", "args": vars(args), "git_commit": commit,
              "world_size": info.world_size, "train_images": len(train_loader.dataset), "classes": classes}
    started, first = time.perf_counter(), state.epoch

    def validate() -> None:
        """Validate the last epoch trained, whose training figures `state.unvalidated` holds; log
        its record, save. A stop signal or an unreadable image during validation saves it as
        trained, not validated, for a relaunch to validate."""
        epoch, trained = state.epoch - 1, state.unvalidated["train"]
        try:  # the generators as training left them, however often an epoch is validated
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                va = evaluate(eval_model, val_loader, loop, prepare=prepare_val)
        except DataError as e:
            saver.save(state, student, optimizer, record)
            raise DataError(f"{e}; epoch {epoch} was trained and saved, not validated: relaunch once the "
                            "file is fixed") from None
        if va.stopped_at is not None:
            saver.save(state, student, optimizer, record)
            raise Stopped.by(stop, f"while validating epoch {epoch} (trained; a relaunch validates it)", saver.path)
        is_best = state.best_top1 is None or va.top1 > state.best_top1
        state.best_top1 = max(va.top1, state.best_top1 or va.top1)
        done_here = state.epoch - first  # epochs this launch trained
        per_epoch = (time.perf_counter() - started) / done_here if done_here else trained["epoch_time"]
        eta = datetime.timedelta(seconds=round(per_epoch * (args.epochs - state.epoch)))
        logger.log_epoch(
            f"* Acc@1 {va.top1:.3f} Acc@5 {va.top5:.3f} (val loss {va.loss:.4f}, {va.count} images; best "
            f"Acc@1 {state.best_top1:.3f}; train {trained['images_per_s']:.1f} img/s; ETA {eta})",
            {**trained, "val_loss": va.loss, "val_top1": va.top1, "val_top5": va.top5, "val_images": va.count,
             "best_top1": state.best_top1}, state.unvalidated["analysis"])
        state.unvalidated = None
        saver.save(state, student, optimizer, record, is_best)

    if state.unvalidated is not None:
        validate()
    last = args.epochs if args.stop_after_epochs is None else min(args.epochs, state.epoch + args.stop_after_epochs)
    for epoch in range(state.epoch, last):
        saver.check_space(student, args.optimizer)
        lr = optimizer.param_groups[0]["lr"]
        log(f"=> epoch {epoch}/{args.epochs}: learning_rate {lr:.6e}")
        train_loader.sampler.set_epoch(epoch, start=state.progress.iteration * train_loader.batch_size)
        tr = train_one_epoch(model, teacher, train_loader, DistributionLoss(), optimizer, epoch, loop,
                             prepare=prepare_train, progress=state.progress, monitor=monitor)
        log_data_notes(tr, prepare_train, log, nvjpeg=device.type == "cuda" and epoch == first)
        if tr.stopped_at is not None:
            saver.save(state, student, optimizer, record)
            raise Stopped.by(stop, f"in epoch {epoch} after iteration {tr.stopped_at}", saver.path)
        state.progress = Progress()
        scheduler.step()
        broadcast_buffers(student)  # every rank validates, and the checkpoint holds, rank 0's BN stats
        state.epoch = epoch + 1
        state.unvalidated = {
            "train": {"epoch": epoch, "lr": lr, "train_loss": tr.loss, "train_top1": tr.top1, "train_top5": tr.top5,
                      "images_per_s": tr.images_per_s, "epoch_time": tr.time},
            "analysis": monitor.epoch_metrics() if monitor is not None else {}}
        validate()
        if epoch + 1 < last and signalled(stop, device):
            raise Stopped.by(stop, f"after epoch {epoch}", saver.path)
    if monitor is not None:
        monitor.close()
    if last < args.epochs:
        log(f"=> stopped after epoch {last} of {args.epochs} (--stop-after-epochs); relaunch to resume")
    else:
        log(f"=> done: best val Acc@1 {state.best_top1:.3f}, model in {os.path.join(args.save, 'model_best.pth.tar')}")
    return student


def log_data_notes(stats, prepare, log, nvjpeg: bool) -> None:
    """What the epoch's data loading met: skipped unreadable images; with `nvjpeg` (the torch
    backend on CUDA, said for a launch's first epoch: the same files every epoch), the images
    nvjpeg could not take."""
    for path, reason in stats.skipped:
        log(f"=> skipped unreadable training image {path} ({reason})")
    if hasattr(prepare, "take_counts"):
        counts = prepare.take_counts()
        if nvjpeg and counts["cpu_decoded"]:
            log(f"=> {counts['cpu_decoded']} of {counts['decoded']} training images were not "
                "nvjpeg-decodable (CMYK, grayscale, not JPEG) and were decoded on the CPU (said once)")


if __name__ == "__main__":
    main()
