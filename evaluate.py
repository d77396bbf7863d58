"""Evaluate a ReActNet-A checkpoint on DIR/val and print `* Acc@1 X Acc@5 Y`.

    python evaluate.py --checkpoint PATH --data DIR                 # CPU or one GPU
    python -m torch.distributed.run --nproc_per_node 8 evaluate.py --checkpoint PATH --data DIR

PATH is a checkpoint of this repository (either step) or a released one (AdamBNN or ReActNet
layout, detected from the file). The step (real or binary block weights) comes from the
checkpoint's 'step' entry; the released files have none, and are taken as step 2 (--step to
override). Each validation image is counted once, whatever the number of processes.
A packed 1-bit file of utils.export (step 2) is detected and evaluated the same way.
"""
import argparse
import json
import os
import sys

import torch

from models import reactnet_a
from utils.checkpoint import (CheckpointError, check_finite, checkpoint_step, detect_format, is_packed,
                              load_weights, read_checkpoint)
from utils.data import DataError, default_workers, to_device, val_loader
from utils.distributed import cleanup, get_rank, init_distributed
from utils.engine import evaluate
from utils.export import load_packed
from utils.train import PRECISIONS, autocast_dtype, set_precision


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (this repository's or released)")
    p.add_argument("--data", default=os.environ.get("DATA"), help="ImageFolder root with val/ (default: $DATA)")
    p.add_argument("--step", type=int, choices=(1, 2), default=None,
                   help="for checkpoints without a 'step' entry (released ones): 2 by default")
    p.add_argument("--batch_size", type=int, default=256, help="global batch size")
    p.add_argument("-j", "--workers", type=int, default=None, help="loader workers per process")
    p.add_argument("--input-size", type=int, default=None,
                   help="centre crop after resizing to size*256/224 (default: the training crop size the "
                        "checkpoint records, else 224)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="as in training (utils/train.py)")
    p.add_argument("--data-backend", choices=("pil", "torch"), default="pil",
                   help="pil: PIL in the loader workers; torch: decode (nvjpeg on CUDA) and resize on the device")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on with CUDA)")
    p.add_argument("--compile", nargs="?", const="inductor", default="none", metavar="BACKEND",
                   help="torch.compile the model (backend: inductor unless given; off by default: one "
                        "pass over the data rarely repays the compilation)")
    p.add_argument("--results-file", default=None,
                   help="append a JSON line: model, checkpoint, step, top1, top5, params, ops, images")
    return p


def num_classes_of(obj) -> int:
    _, state_dict = detect_format(obj)
    for key, value in state_dict.items():
        if key.endswith("fc.weight"):
            return value.shape[0]
    raise CheckpointError("the checkpoint has no fc.weight: not a ReActNet-A checkpoint")


def run(args):
    if not args.data:
        raise SystemExit("error: no data: pass --data DIR or set DATA (a folder with val/)")
    info = init_distributed()
    if args.batch_size % info.world_size:
        raise SystemExit(f"error: --batch_size {args.batch_size} (global) does not split evenly over "
                         f"{info.world_size} processes: use a multiple of {info.world_size}")
    obj = read_checkpoint(args.checkpoint)
    # A packed 1-bit file of utils.export: a step-2 network, built from the file alone.
    packed = load_packed(args.checkpoint) if is_packed(obj) else None
    saved_step = 2 if packed else checkpoint_step(obj)
    if saved_step is not None and args.step not in (None, saved_step):
        raise SystemExit(f"error: {args.checkpoint} is a step-{saved_step} checkpoint, not step {args.step}")
    step = saved_step or args.step or 2
    trained_at = obj.get("args", {}).get("input_size") if saved_step else None
    input_size = args.input_size or trained_at or 224
    size_note = "from the checkpoint" if not args.input_size and trained_at else \
        (f"the model was trained at {trained_at}" if trained_at and trained_at != input_size else "")
    workers = args.workers if args.workers is not None else default_workers(info.local_world_size)
    loader_args = (args.data, args.batch_size // info.world_size, workers, info.world_size, info.rank,
                   info.device.type == "cuda", input_size)
    if args.data_backend == "torch":
        from utils.torch_data import torch_val_loader
        loader, prepare = torch_val_loader(*loader_args)
    else:
        loader, prepare = val_loader(*loader_args), to_device
    classes = num_classes_of(obj)
    if classes != len(loader.dataset.classes):
        raise SystemExit(f"error: the checkpoint has {classes} classes, {args.data}/val has "
                         f"{len(loader.dataset.classes)}")
    if packed:
        model, fmt = packed, "packed 1-bit"
    else:
        model = reactnet_a(binary_weights=step == 2, num_classes=classes)
        fmt = load_weights(model, obj)
    check_finite(model.state_dict(), args.checkpoint)
    del obj
    how = "from the checkpoint" if saved_step else ("--step" if args.step else "default for released checkpoints")
    if info.is_main:
        print(f"=> {args.checkpoint}: {fmt} checkpoint, step {step} ({how}); "
              f"input size {input_size}{f' ({size_note})' if size_note else ''}; {len(loader.dataset)} images, "
              f"{info.world_size} process(es)", flush=True)
    counts = None
    if args.results_file and info.is_main:
        from utils.ops import count_ops
        counts = count_ops(model, (1, 3, input_size, input_size))
    channels_last = info.device.type == "cuda" if args.channels_last is None else args.channels_last
    set_precision(args.precision)
    model.to(info.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    stats = evaluate(model if args.compile == "none" else torch.compile(model, backend=args.compile),
                     loader, info.device, prepare=prepare, autocast_dtype=autocast_dtype(args.precision),
                     channels_last=channels_last)
    if info.is_main:
        print(f"* Acc@1 {stats.top1:.3f} Acc@5 {stats.top5:.3f}", flush=True)
        if args.results_file:
            row = {"model": "reactnet_a", "checkpoint": os.path.abspath(args.checkpoint), "step": step,
                   "top1": stats.top1, "top5": stats.top5, "params": counts["params"],
                   "ops": counts["ops"], "images": stats.count}
            os.makedirs(os.path.dirname(os.path.abspath(args.results_file)), exist_ok=True)
            with open(args.results_file, "a") as f:
                f.write(json.dumps(row) + "\n")
    return stats


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        stats = run(args)
    except (CheckpointError, DataError, SystemExit) as e:
        msg = e.code if isinstance(e, SystemExit) else f"error: {e}"
        if not isinstance(msg, str):
            raise
        if get_rank() == 0:
            print(msg, file=sys.stderr)
        sys.exit(1)
    cleanup()
    return stats


if __name__ == "__main__":
    main()
