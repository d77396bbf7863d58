"""`python -m utils.bench loader`: the train transform pipeline (utils.data.train_transform: JPEG
decode, RandomResizedCrop, Lighting, flip, ToTensor, Normalize) in images/s for one loader worker,
stage by stage, on JPEGs it generates; and how many workers a training rate needs."""
import os
import statistics
import tempfile
import time

import torch
from torchvision.datasets.folder import pil_loader  # what ImageFolder decodes with

from .. import data
from ..machine import cpu_name, load_average
from .common import make_jpegs


def seconds_per_input(fn, inputs, reps: int) -> float:
    """Median over `reps` passes of the seconds per input of `fn` over `inputs`."""
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        for x in inputs:
            fn(x)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) / len(inputs)


def run_loader_benchmark(args) -> dict:
    """Images/s of the train transform in one process with one torch thread (as in a DataLoader
    worker), and the time of each stage of it."""
    torch.set_num_threads(1)
    width, height = args.image_size
    tf = data.train_transform(args.input_size)
    res = {"image_size": [width, height], "images": args.images, "input_size": args.input_size,
           "quality": args.quality, "cpu": cpu_name(), "torch": torch.__version__,
           "stages_ms": {}, "load_average_start": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(tmp, args.images, width, height, args.quality)
        res["mean_file_kib"] = sum(map(os.path.getsize, paths)) / len(paths) / 1024

        torch.manual_seed(0)
        for p in paths[:4]:
            tf(pil_loader(p))  # warm-up
        reps = args.reps
        res["images_per_s"] = 1 / seconds_per_input(lambda p: tf(pil_loader(p)), paths, reps)
        # Stage by stage, on the same images.
        decoded = [pil_loader(p) for p in paths]
        rrc, lighting, flip, to_tensor, normalize = tf.transforms
        crops = [rrc(im) for im in decoded]
        lit = [lighting(im) for im in crops]
        flipped = [flip(im) for im in lit]
        tensors = [to_tensor(im) for im in flipped]
        stage = {}
        stage["decode (PIL open + convert RGB)"] = seconds_per_input(pil_loader, paths, reps)
        for name, fn, inputs in (("RandomResizedCrop", rrc, decoded), ("Lighting", lighting, crops),
                                 ("RandomHorizontalFlip", flip, lit), ("ToTensor", to_tensor, flipped),
                                 ("Normalize", normalize, tensors)):
            stage[name] = seconds_per_input(fn, inputs, reps)
        res["stages_ms"] = {k: 1000 * v for k, v in stage.items()}
        draft, size = data.draft_loader, args.input_size
        res["draft_images_per_s"] = 1 / seconds_per_input(lambda p: tf(draft(p, size)), paths, reps)
        res["draft_decode_ms"] = 1000 * seconds_per_input(lambda p: draft(p, size), paths, reps)
    res["load_average_end"] = load_average()
    return res


def format_loader(res: dict, train_images_per_s=None) -> str:
    w, h = res["image_size"]
    lines = [f"train transform, one worker (1 torch thread), {res['images']} generated {w}x{h} JPEGs "
             f"(quality {res['quality']}, {res['mean_file_kib']:.0f} KiB on average) -> "
             f"{res['input_size']}x{res['input_size']}; {res['cpu']}; load average "
             f"{res['load_average_start']} (start), {res['load_average_end']} (end)", "",
             "| stage | ms/image |", "| --- | ---: |"]
    for k, v in res["stages_ms"].items():
        lines.append(f"| {k} | {v:.2f} |")
    lines.append(f"| whole pipeline | {1000 / res['images_per_s']:.2f} |")
    lines += ["", f"images/s per worker: {res['images_per_s']:.1f}"]
    lines.append(f"images/s per worker with the opt-in reduced-size JPEG decode (utils.data."
                 f"draft_loader): {res['draft_images_per_s']:.1f} (decode {res['draft_decode_ms']:.2f} "
                 f"ms/image; no gain for images under twice the crop size)")
    lines.append("loader workers needed = training images/s / images/s per worker")
    if train_images_per_s:
        lines.append(f"  at {train_images_per_s:.1f} training images/s: "
                     f"{train_images_per_s / res['images_per_s']:.2f} workers")
    return "\n".join(lines)
