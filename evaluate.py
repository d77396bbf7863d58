"""Evaluate a ReActNet-A checkpoint on DIR/val and print `* Acc@1 X Acc@5 Y`.

    python evaluate.py --checkpoint PATH --data DIR                 # CPU or one GPU
    python -m torch.distributed.run --standalone --nproc_per_node 8 evaluate.py --checkpoint PATH --data DIR

PATH is a checkpoint of this repository (either step), a released one (AdamBNN or ReActNet
layout, detected from the file), or a packed 1-bit file of utils.export. The step (real or binary
block weights) comes from the checkpoint's 'step' entry; the released files have none and are
taken as step 2 (--step to override). The input size is the training crop size the checkpoint
records (packed files too), else 224, said so. Every long flag is accepted with '-' or '_'. Each
validation image is counted once, whatever the number of processes.
"""
import argparse
import json
import os

import torch

from models import reactnet_a
from utils.checkpoint import (check_finite, checkpoint_step, detect_format, is_packed, load_weights,
                              num_classes, read_checkpoint, trained_input_size)
from utils.cli import UserError, exit_on_error
from utils.config import HelpFormatter, Parser
from utils.data import build_loader
from utils.distributed import cleanup, init_distributed
from utils.engine import evaluate
from utils.export import load_packed
from utils.precision import PRECISIONS, set_precision


def get_parser():
    p = Parser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (this repository's, released, or packed)")
    p.add_argument("--data", default=os.environ.get("DATA"), help="ImageFolder root with val/ (default: $DATA)")
    p.add_argument("--step", type=int, choices=(1, 2), default=None,
                   help="for checkpoints without a 'step' entry (released ones): 2 by default")
    p.add_argument("--batch_size", type=int, default=256, help="global batch size")
    p.add_argument("-j", "--workers", type=int, default=None, help="loader workers per process")
    p.add_argument("--input-size", type=int, default=None,
                   help="centre crop after resizing to size*256/224, a multiple of 32 (default: the training "
                        "crop size the checkpoint records, else 224)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="as in training (utils/precision.py)")
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


def check_args(args) -> None:
    """The flags that cannot work, before anything is read."""
    if not args.data:
        raise UserError("no data: pass --data DIR or set DATA (a folder with val/)")
    for flag, value, least in (("--batch_size", args.batch_size, 1), ("-j/--workers", args.workers, 0),
                               ("--input-size", args.input_size, 32)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if args.input_size is not None and args.input_size % 32:
        raise UserError(f"--input-size {args.input_size} is not a multiple of 32 (ReActNet-A halves the "
                        "resolution five times)")


def evaluate_checkpoint(args):
    """Build the network the checkpoint describes, evaluate it on args.data/val; returns EvalStats."""
    check_args(args)
    info = init_distributed()
    if args.batch_size % info.world_size:
        raise UserError(f"--batch_size {args.batch_size} (global) does not split evenly over "
                        f"{info.world_size} processes: use a multiple of {info.world_size}")
    obj = read_checkpoint(args.checkpoint)
    packed = is_packed(obj)
    saved_step = 2 if packed else checkpoint_step(obj)
    if saved_step is not None and args.step not in (None, saved_step):
        raise UserError(f"{args.checkpoint} is a step-{saved_step} checkpoint, not step {args.step}")
    step = saved_step or args.step or 2
    trained_at = trained_input_size(obj)
    input_size = args.input_size or trained_at or 224
    if args.input_size:
        size_note = f"the model was trained at {trained_at}" if trained_at not in (None, input_size) else ""
    else:
        size_note = "from the checkpoint" if trained_at else \
            "the checkpoint does not record its training size: the default; pass --input-size N"
    loader, prepare = build_loader("val", args.data_backend, args.data, args.batch_size, info,
                                   workers=args.workers, input_size=input_size)
    if packed:
        model, fmt = load_packed(obj, name=args.checkpoint), "packed 1-bit"
    else:
        model = reactnet_a(binary_weights=step == 2, num_classes=num_classes(detect_format(obj)[1]))
        fmt = load_weights(model, obj)
    classes = model.fc.out_features
    if classes != len(loader.dataset.classes):
        raise UserError(f"{args.checkpoint} has {classes} classes, {args.data}/val has {len(loader.dataset.classes)}")
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
                     loader, info.device, prepare=prepare, precision=args.precision, channels_last=channels_last)
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
    with exit_on_error():
        stats = evaluate_checkpoint(args)
        cleanup()
    return stats


if __name__ == "__main__":
    main()
