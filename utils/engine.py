"""The training and evaluation loops, nothing else: the same for both steps.

Both loops take batches from a loader and turn each into a `utils.data.Batch` on the device with
`prepare(batch, device)` (the data backend's: a copy for PIL, decoding and augmenting for torch),
and run as their `LoopSettings` say (device, arithmetic, memory format, logging, limits).
The training loop waits for the device only to print a progress line and every `SYNC_EVERY`
iterations; there the processes agree on whether to stop: a stop signal (preemption), a
non-finite loss, or more unreadable images than allowed. Validation inside training agrees on a
stop signal every `SYNC_EVERY` batches too, so that a stop takes as long in either phase.
"""
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import to_device
from .distributed import all_gather_object, all_reduce_max, all_reduce_sum
from .errors import DataError, NonFiniteLoss
from .logger import AverageMeter, progress_line, validation_line
from .precision import autocast, memory_format
from .run_folder import Progress

__all__ = ["LoopSettings", "TrainStats", "EvalStats", "train_one_epoch", "evaluate", "train_step", "correct_topk",
           "signalled"]

SYNC_EVERY = 10  # iterations between the processes' checks (each waits for the device once)


@dataclass
class LoopSettings:
    """How the loops run, the same in every epoch of a run. `stop()` says whether a stop signal
    came (utils.preempt.StopRequest); `log` takes the progress lines (None: none are made);
    `max_skipped`: unreadable training images skipped per epoch (--skip-bad-images); `on_logits`:
    evaluate() scores `on_logits(logits)` in place of each batch's float logits, the batches in
    the loader's order (evaluate.py: the classes absent from the data masked, ReaL labels)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    channels_last: bool = False
    print_freq: int = 10
    log: Callable | None = None
    world_size: int = 1  # processes, for the images/s of all of them
    max_skipped: int = 0
    stop: Callable | None = None
    on_logits: Callable | None = None


@dataclass
class TrainStats:
    loss: float
    top1: float
    top5: float
    count: int          # images, all processes
    images_per_s: float
    time: float         # seconds, this launch's part of the epoch included only
    stopped_at: int | None = None  # iterations done when a stop signal ended the epoch early
    skipped: list = field(default_factory=list)  # (path, reason) of unreadable images, this process


@dataclass
class EvalStats:
    loss: float
    top1: float
    top5: float
    count: int
    stopped_at: int | None = None  # batches done when a stop signal ended the pass early


def train_step(student, teacher, images, criterion, optimizer, precision="fp32", monitor=None):
    """One iteration: teacher forward (no_grad), student forward, distillation loss, backward,
    optimizer step, zero_grad. Labels are not used (distillation only, as in the original).
    `precision`: utils.precision's mode (bf16: autocast). Returns the loss (a detached tensor) and
    the student's logits."""
    with autocast(images.device, precision):
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = student(images)
    loss = criterion(logits, teacher_logits)  # at least float32 whatever the autocast dtype
    loss.backward()
    if monitor is not None:
        monitor.before_step()
    optimizer.step()
    if monitor is not None:
        monitor.after_step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach()


def correct_topk(logits, target, topk=(1, 5)) -> list:
    """Number of samples whose target is among the top k logits, for each k (k capped at the
    number of classes), as float tensors."""
    maxk = min(max(topk), logits.size(1))
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, :min(k, maxk)].any(dim=1).sum().float() for k in topk]


def train_one_epoch(student, teacher, loader, criterion, optimizer, epoch, settings: LoopSettings, *,
                    prepare=to_device, progress=None, monitor=None) -> TrainStats:
    """Train one epoch, or its rest from `progress` (a mid-epoch checkpoint's). Returns the
    training metrics over all processes; `stopped_at` is set when `settings.stop()` (a signal)
    ended it early. Raises NonFiniteLoss, and DataError past `settings.max_skipped` unreadable
    images.

    The iterations the analysis's `monitor` measures run `student` uncompiled (a torch.compile'd
    module's `_orig_mod`): its hooks would make the compiled one recompile."""
    device, log, stop, max_skipped = settings.device, settings.log, settings.stop, settings.max_skipped
    student.train()
    teacher.eval()
    progress = progress or Progress()
    first = progress.iteration
    num_batches = first + len(loader)
    batch_time, data_time = AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f")
    # loss * n, correct@1, correct@5 on the device: no synchronization per iteration.
    sums = progress.sums if progress.sums is not None else torch.zeros(3, device=device)
    count, skipped = progress.count, []
    first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)
    fmt = memory_format(settings.channels_last)
    start = end = time.perf_counter()
    i = first - 1
    for i, raw in enumerate(loader, start=first):
        batch = prepare(raw, device)
        skipped += batch.bad
        images = batch.images.contiguous(memory_format=fmt)
        data_time.update(time.perf_counter() - end)
        model = student
        if monitor is not None:
            monitor.start_iteration(i)
            if monitor.measuring:
                model = getattr(student, "_orig_mod", student)
        if images.size(0) == 0:  # (a process cannot skip an iteration the others take)
            path, reason = batch.bad[0]
            raise DataError(f"every training image of a batch is unreadable, e.g. {path} ({reason})")
        loss, logits = train_step(model, teacher, images, criterion, optimizer, settings.precision, monitor)
        first_nonfinite = torch.where((first_nonfinite < 0) & ~torch.isfinite(loss),
                                      i, first_nonfinite)
        n = images.size(0)
        batch_sums = torch.stack([loss * n, *correct_topk(logits, batch.target)])
        sums += batch_sums
        count += n
        batch_time.update(time.perf_counter() - end)
        last = i == num_batches - 1
        printing = log is not None and (i % settings.print_freq == 0 or last)
        if printing:
            b, s = (batch_sums / n).tolist(), (sums / count).tolist()  # synchronizes, at print time only
            log(progress_line(
                epoch, i, num_batches, batch_time, data_time, loss=(b[0], s[0]),
                top1=(100 * b[1], 100 * s[1]), top5=(100 * b[2], 100 * s[2]),
                lr=optimizer.param_groups[0]["lr"], images_per_s=n * settings.world_size / batch_time.avg))
        end = time.perf_counter()
        if printing or (i + 1) % SYNC_EVERY == 0 or last:  # a printed line waited already
            flags = all_reduce_max(torch.stack([
                first_nonfinite >= 0, torch.tensor(len(skipped) > max_skipped, device=device),
                torch.tensor(bool(stop and stop()) and not last, device=device)]).long()).tolist()
            if flags[0]:
                where = int(first_nonfinite) if first_nonfinite >= 0 else "?"
                raise NonFiniteLoss(f"the loss is not finite (NaN or inf) in epoch {epoch}, first at "
                                    f"iteration {where} of this process (checked at iteration {i}); the "
                                    "learning rate may be too high")
            if flags[1]:
                raise DataError(_unreadable_message(skipped, max_skipped))
            if flags[2]:
                break
    elapsed = progress.time + time.perf_counter() - start
    stopped_at = i + 1 if i + 1 < num_batches else None
    if stopped_at is not None:  # the state to save; the metrics are the rest of the epoch's
        progress.iteration, progress.sums, progress.count, progress.time = stopped_at, sums, count, elapsed
        return TrainStats(0.0, 0.0, 0.0, count, 0.0, elapsed, stopped_at, skipped)
    loss_sum, c1, c5, total = all_reduce_sum(torch.cat([sums, sums.new_tensor([count])])).tolist()
    total = max(total, 1)
    return TrainStats(loss_sum / total, 100 * c1 / total, 100 * c5 / total, int(total),
                      total / max(elapsed, 1e-9), elapsed, None, skipped)


def _unreadable_message(skipped, max_skipped) -> str:
    """Collective: every process names the same file, whichever of them gets to print it."""
    path, reason = first_everywhere(skipped[-1:])
    over = f" ({len(skipped)} this epoch, more than --skip-bad-images {max_skipped})" if max_skipped and skipped else ""
    return (f"training image {path} is unreadable ({reason}){over}: remove or replace it, or pass "
            "--skip-bad-images N to skip up to N per epoch")


def signalled(stop, device) -> bool:
    """Whether any process has received a stop signal (collective: they stop together, none goes
    on to wait for the others)."""
    return bool(all_reduce_max(torch.tensor([int(stop())], device=device)).item())


def first_everywhere(items: list):
    """This process's first item, else the first item of the lowest rank that has one, on every
    process (collective; only on an error's path): a process stopped by the launcher before it
    prints leaves the others' messages complete."""
    everyone = [x for theirs in all_gather_object(items[:1]) for x in theirs]  # every process joins
    return (items[:1] or everyone)[0]


@torch.no_grad()
def evaluate(model, loader, settings: LoopSettings, *, prepare=to_device) -> EvalStats:
    """Plain cross-entropy loss, top-1 and top-5 (%) over the images of all processes' shards
    (each image once), and their count, on `settings.device` with its precision and memory format;
    a progress line every `settings.print_freq` batches (timed on the host: no waiting for the
    device). An unreadable image is never skipped: every process finishes its shard, then all
    raise DataError naming a file (this process's, else another's).

    With `settings.stop`, the processes agree every SYNC_EVERY batches, from the first, on whether
    a stop signal came, at batches every shard has; `stopped_at` is then set and the figures are
    not computed."""
    device, log, stop = settings.device, settings.log, settings.stop
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, correct@1, correct@5, count
    bad = []
    fmt = memory_format(settings.channels_last)
    num_batches = len(loader)
    # The shards differ by an image at most, their batch counts by one: every process has the
    # batches of the shortest shard.
    common = -int(all_reduce_max(torch.tensor([-num_batches], device=device)).item()) if stop else 0
    batch_time, data_time = AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f")
    end = time.perf_counter()
    for i, raw in enumerate(loader):
        batch = prepare(raw, device)
        bad += batch.bad
        data_time.update(time.perf_counter() - end)
        if batch.images.size(0):
            with autocast(device, settings.precision):
                logits = model(batch.images.contiguous(memory_format=fmt))
            logits = logits.float() if settings.on_logits is None else settings.on_logits(logits.float())
            sums += torch.stack([F.cross_entropy(logits, batch.target, reduction="sum"),
                                 *correct_topk(logits, batch.target),
                                 logits.new_tensor(logits.size(0))]).double()
        batch_time.update(time.perf_counter() - end)
        if log is not None and (i % settings.print_freq == 0 or i == num_batches - 1):
            n = batch.images.size(0) * settings.world_size
            log(validation_line(i, num_batches, batch_time, data_time, n / batch_time.avg))
        end = time.perf_counter()
        if i < common and i % SYNC_EVERY == 0 and signalled(stop, device):
            return EvalStats(0.0, 0.0, 0.0, 0, stopped_at=i + 1)
    loss, c1, c5, count, num_bad = all_reduce_sum(torch.cat([sums, sums.new_tensor([len(bad)])])).tolist()
    if num_bad:
        path, reason = first_everywhere(bad)
        where = f"{path} ({reason})"
        raise DataError(f"{int(num_bad)} validation image(s) unreadable, e.g. {where}: validation "
                        "counts every image, so remove or replace it")
    n = max(count, 1)
    return EvalStats(loss / n, 100 * c1 / n, 100 * c5 / n, int(count))
