"""The training and evaluation loops, nothing else: the same for both steps."""
import contextlib
import time

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum
from .logger import AverageMeter, progress_line


def autocast(device: torch.device, dtype):
    """torch.autocast for `dtype` (e.g. torch.bfloat16), or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(student, teacher, images, criterion, optimizer, autocast_dtype=None, monitor=None):
    """One iteration: teacher forward (no_grad), student forward, distillation loss, backward,
    optimizer step, zero_grad. Labels are not used (distillation only, as in the original).
    Returns the loss (a detached tensor) and the student's logits."""
    with autocast(images.device, autocast_dtype):
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = student(images)
    loss = criterion(logits, teacher_logits)  # float32 whatever the autocast dtype
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


def train_one_epoch(student, teacher, loader, criterion, optimizer, epoch, device, *,
                    autocast_dtype=None, channels_last=False, monitor=None, print_freq=10,
                    log=None, world_size=1) -> dict:
    """Train one epoch; returns loss, top1, top5 (train, over all processes), count, images/s
    and time. `log(str)` receives the progress line every `print_freq` iterations."""
    student.train()
    teacher.eval()
    num_batches = len(loader)
    batch_time, data_time = AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f")
    sums = torch.zeros(3, device=device)  # loss * n, correct@1, correct@5 (no sync per iteration)
    count = 0
    start = end = time.perf_counter()
    for i, (images, target) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        data_time.update(time.perf_counter() - end)
        if monitor is not None:
            monitor.start_iteration(i)
        loss, logits = train_step(student, teacher, images, criterion, optimizer,
                                  autocast_dtype, monitor)
        n = images.size(0)
        batch = torch.stack([loss * n, *correct_topk(logits, target)])
        sums += batch
        count += n
        batch_time.update(time.perf_counter() - end)
        if log is not None and (i % print_freq == 0 or i == num_batches - 1):
            b, s = (batch / n).tolist(), (sums / count).tolist()  # synchronizes, at print time only
            log(progress_line(
                epoch, i, num_batches, batch_time, data_time, loss=(b[0], s[0]),
                top1=(100 * b[1], 100 * s[1]), top5=(100 * b[2], 100 * s[2]),
                lr=optimizer.param_groups[0]["lr"], images_per_s=n * world_size / batch_time.avg))
        end = time.perf_counter()
    elapsed = time.perf_counter() - start
    loss_sum, c1, c5, count = all_reduce_sum(torch.cat([sums, sums.new_tensor([count])])).tolist()
    count = max(count, 1)
    return {"loss": loss_sum / count, "top1": 100 * c1 / count, "top5": 100 * c5 / count,
            "count": int(count), "images_per_s": count / elapsed, "time": elapsed}


@torch.no_grad()
def evaluate(model, loader, device, *, autocast_dtype=None, channels_last=False) -> dict:
    """Plain cross-entropy loss, top-1 and top-5 (%) over the images of all processes' shards
    (each image once), and their count."""
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, correct@1, correct@5
    count = 0
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, autocast_dtype):
            logits = model(images)
        logits = logits.float()
        sums += torch.stack([F.cross_entropy(logits, target, reduction="sum"),
                             *correct_topk(logits, target)]).double()
        count += images.size(0)
    loss, c1, c5, count = all_reduce_sum(torch.cat([sums, sums.new_tensor([count])])).tolist()
    n = max(count, 1)
    return {"loss": loss / n, "top1": 100 * c1 / n, "top5": 100 * c5 / n, "count": int(count)}
