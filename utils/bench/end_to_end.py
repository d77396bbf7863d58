"""`python -m utils.bench end-to-end`: images/s of the training loop fed by each data backend.

The loop is utils.engine.train_step's; the backends are `pil` (utils.data.train_loader, then the
transfer) and `torch` (utils.torch_data: decode and augmentation on the device), beside the same
model on one pre-made batch ("model only"); on generated JPEGs or `--data DIR`.
"""
import itertools
import tempfile
import time

from .. import data
from ..machine import load_average
from ..torch_data import torch_train_loader
from .common import describe_machine, machine_info, make_image_folder, sync
from .iteration import Runner


def endless(loader):
    """The loader's batches, epoch after epoch (set_epoch called as the training loop does)."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from loader


def images_per_s(runner: Runner, batches, iterations: int, warmup: int) -> float:
    """Training images/s over `iterations` iterations on the image batches `batches` yields,
    after `warmup` untimed ones (which also start the loader's workers)."""
    for _ in range(warmup):
        runner.train(next(batches))
    sync()
    start, count = time.perf_counter(), 0
    for _ in range(iterations):
        images = next(batches)
        loss, _ = runner.train(images)
        count += images.size(0)
    loss.item()
    sync()
    return count / (time.perf_counter() - start)


def run_end_to_end(args) -> dict:
    """Images/s of the training loop fed by each data backend, beside the model alone."""
    device = args.device
    cuda = device.type == "cuda"
    mode = "+".join(p for p, on in (("bf16", args.precision == "bf16"), ("channels_last", args.channels_last),
                                    ("compile", args.compile)) if on) or "repo"
    width, height = args.image_size
    res = {"machine": machine_info(device), "batch_size": args.batch_size, "input_size": args.input_size,
           "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
           "workers": args.workers,
           "iterations": args.iterations, "warmup": args.warmup, "load_average_start": load_average(),
           "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or make_image_folder(tmp, args.images, width, height, args.quality)
        res["data"] = args.data or f"{args.images} generated {width}x{height} JPEGs (quality {args.quality})"
        for step in args.steps:
            runner = Runner(mode, step, args.batch_size, args.input_size, device, args.num_classes)
            pil = data.train_loader(root, args.batch_size, args.workers, pin_memory=cuda,
                                    input_size=args.input_size)
            loader, prepare = torch_train_loader(root, args.batch_size, args.workers, pin_memory=cuda,
                                                 input_size=args.input_size)
            pipelines = {
                "model only": itertools.repeat(runner.images),
                "pil": (data.to_device(raw, device).images for raw in endless(pil)),
                "torch": (prepare(batch, device).images for batch in endless(loader)),
            }
            for name, batches in pipelines.items():
                row = {"step": step, "pipeline": name,
                       "images_per_s": images_per_s(runner, batches, args.iterations, args.warmup)}
                if name == "torch":
                    row["counts"] = prepare.take_counts()
                res["rows"].append(row)
            del pipelines, pil, loader  # stop the workers
    res["load_average_end"] = load_average()
    return res


def format_end_to_end(res: dict) -> str:
    m = res["machine"]
    lines = [f"end to end: training loop (utils.engine.train_step), batch {res['batch_size']} at "
             f"{res['input_size']}x{res['input_size']}, {res['precision']}"
             f"{', channels_last' if res['channels_last'] else ''}{', compile' if res['compile'] else ''}, "
             f"{res['workers']} loader workers; "
             f"{res['data']}; {res['iterations']} timed iterations after {res['warmup']} warm-up; "
             f"{describe_machine(m)}; load average {res['load_average_start']} (start), "
             f"{res['load_average_end']} (end)", "",
             "| step | pipeline | images/s | vs model only |", "| --- | --- | ---: | ---: |"]
    alone = {r["step"]: r["images_per_s"] for r in res["rows"] if r["pipeline"] == "model only"}
    for r in res["rows"]:
        lines.append(f"| {r['step']} | {r['pipeline']} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s'] / alone[r['step']]:.2f}x |")
    lines += ["", "model only: the same iterations on one pre-made batch on the device; pil: "
              "utils.data.train_loader (decode and transform in the workers) + transfer; torch: "
              "utils.torch_data (workers read the bytes; decode and augment on the device; counts "
              f"{[r['counts'] for r in res['rows'] if 'counts' in r]}). The loader prefetches 4 "
              "batches per worker during the warm-up: time many more iterations than that, or the "
              "workers' share does not show."]
    return "\n".join(lines)
