"""Evaluate a ReActNet-A checkpoint on DIR/val and print `* Acc@1 X Acc@5 Y`.

    python evaluate.py --checkpoint PATH --data DIR                 # CPU or one GPU
    python -m torch.distributed.run --standalone --nproc_per_node 8 evaluate.py --checkpoint PATH --data DIR

PATH is a checkpoint of this repository (either step), a released one (AdamBNN or ReActNet
layout, detected from the file), or a packed 1-bit file of utils.export. The step (real or binary
block weights) comes from the checkpoint's 'step' entry; the released files have none and are
taken as step 2 (--step to override). The input size is the training crop size the checkpoint
records (packed files too), else 224, said so. The flags it shares with training, and their
checks, are utils/cli.py's. Each validation image is counted once, whatever the number of
processes.

The class folders are mapped onto the network's classes by name, as class indices (0 ... N-1)
or by --class-map (utils/classes.py), and the line before the accuracy says how, and how many
of the network's classes the data holds. The accuracy is over all the network's classes unless
--present-classes-only (ImageNet-A and -R) restricts the predictions to the present ones;
--real-labels FILE adds ImageNet-ReaL's `* ReaL Acc@1 X Acc@5 Y` (utils/real_labels.py).
ImageNet's variants, their layouts and protocols: docs/evaluation.md.
"""
import json
import os

import torch

from models import reactnet_a
from utils.checkpoint import (check_finite, checkpoint_step, detect_format, is_packed, load_weights, num_classes,
                              read_checkpoint, recorded_classes, trained_input_size)
from utils.classes import map_classes, read_class_map, relabel
from utils.cli import (Parser, add_device_flags, add_loader_flags, check_at_least, check_batch_split,
                       check_data_backend, check_input_size, check_output_file, exit_on_error, resolve_device_layout,
                       say)
from utils.deploy.packed import load_packed
from utils.distributed import cleanup, init_distributed
from utils.engine import LoopSettings, evaluate
from utils.errors import ConfigError, UserError
from utils.loaders import build_loader
from utils.precision import compiled, memory_format, set_precision
from utils.real_labels import RealScorer, check_real_labels, labels_of_images, read_real_labels


def get_parser():
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint file (this repository's, released, or packed)")
    p.add_argument("--data", default=os.environ.get("DATA"), help="ImageFolder root with val/ (default: $DATA)")
    p.add_argument("--step", type=int, choices=(1, 2), default=None,
                   help="for checkpoints without a 'step' entry (released ones): 2 by default")
    add_loader_flags(p, input_size=None, input_size_help="centre crop after resizing to size*256/224, a multiple "
                     "of 32 (default: the training crop size the checkpoint records, else 224)")
    add_device_flags(p, compile_default="none", compile_help="torch.compile the model with BACKEND (inductor "
                     "unless given; off by default: one pass over the data rarely repays the compilation)")
    p.add_argument("--class-map", default=None, metavar="FILE",
                   help="map the class folders onto the network's classes: line k of FILE names the folder of "
                        "class k (default: by the class names the checkpoint records, ImageNet's wnids for a "
                        "1000-class one that records none; folders 0 ... N-1 as class indices)")
    p.add_argument("--present-classes-only", action="store_true",
                   help="score among the classes the data holds only (the protocol of ImageNet-A and -R); "
                        "default: among all the network's classes")
    p.add_argument("--real-labels", default=None, metavar="FILE",
                   help="ImageNet-ReaL's real.json: print the ReaL accuracy too, over the images with a label, "
                        "matched by file name (ILSVRC2012_val_NNNNNNNN.JPEG)")
    p.add_argument("--results-file", default=None,
                   help="append a JSON line: model, checkpoint, step, data, classes, protocol, top1, top5, loss, "
                        "real_top1, real_top5, params, ops, images")
    p.add_argument("--print-freq", type=int, default=10, help="progress line every N batches")
    return p


def check_args(args) -> None:
    """The flags that cannot work, before anything is read."""
    if not args.data:
        raise ConfigError("no data: pass --data DIR or set DATA (a folder with val/)")
    check_at_least(("--batch_size", args.batch_size, 1), ("-j/--workers", args.workers, 0),
                   ("--print-freq", args.print_freq, 1))
    check_input_size(args.input_size)
    check_data_backend(args.data_backend)
    check_output_file(args.results_file, "--results-file", "results.jsonl")


def evaluate_checkpoint(args):
    """Build the network the checkpoint describes, evaluate it on args.data/val; returns EvalStats."""
    check_args(args)
    class_map = read_class_map(args.class_map) if args.class_map else None
    real_labels = read_real_labels(args.real_labels) if args.real_labels else None
    info = init_distributed()
    check_batch_split(args.batch_size, info.world_size)
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
    classes, data = model.fc.out_features, os.path.join(args.data, "val")
    mapping = map_classes(loader.dataset.classes, classes, recorded_classes(obj), class_map, what=args.checkpoint,
                          where=data, class_map_path=args.class_map)
    relabel(loader.dataset, mapping.targets)
    real = None
    if real_labels is not None:
        check_real_labels(real_labels, classes, args.real_labels)
        labels = labels_of_images([path for path, _ in loader.dataset.samples], real_labels, args.real_labels)
        real = RealScorer([labels[i] for i in loader.sampler], info.device)
    check_finite(model.state_dict(), args.checkpoint)
    del obj
    how = "from the checkpoint" if saved_step else ("--step" if args.step else "default for released checkpoints")
    present = mapping.present
    protocol = f"among the {len(present)} present (--present-classes-only)" if args.present_classes_only else \
        f"among all {classes}"
    if info.is_main:
        say(f"=> {args.checkpoint}: {fmt} checkpoint, step {step} ({how}); "
            f"input size {input_size}{f' ({size_note})' if size_note else ''}; {len(loader.dataset)} images, "
            f"{info.world_size} process(es)")
        say(f"=> classes: {mapping.how}; {len(present)} of its {classes} classes present, scored {protocol}")
    counts = None
    if args.results_file and info.is_main:
        from utils.deploy.opcount import count_ops
        counts = count_ops(model, (1, 3, input_size, input_size))
    resolve_device_layout(args, info.device.type == "cuda")
    set_precision(args.precision)
    model.to(info.device, memory_format=memory_format(args.channels_last))
    settings = LoopSettings(device=info.device, precision=args.precision, channels_last=args.channels_last,
                            on_logits=scoring(classes, present if args.present_classes_only else None, real,
                                              info.device),
                            print_freq=args.print_freq, log=say if info.is_main else None, world_size=info.world_size)
    stats = evaluate(compiled(model, args.compile), loader, settings, prepare=prepare)
    real_top1, real_top5, labelled = real.result() if real else (None, None, None)
    if info.is_main:
        say(f"* Acc@1 {stats.top1:.3f} Acc@5 {stats.top5:.3f}")
        if real:
            say(f"* ReaL Acc@1 {real_top1:.3f} Acc@5 {real_top5:.3f} ({labelled} of the {stats.count} images "
                "have ReaL labels)")
        if args.results_file:
            row = {"model": "reactnet_a", "checkpoint": os.path.abspath(args.checkpoint), "step": step,
                   "data": os.path.abspath(data), "input_size": input_size, "classes": mapping.how,
                   "num_classes": classes, "present_classes": len(present),
                   "protocol": "present classes only" if args.present_classes_only else "all classes",
                   "top1": stats.top1, "top5": stats.top5, "loss": stats.loss, "images": stats.count,
                   "params": counts["params"], "ops": counts["ops"]}
            if real:
                row.update(real_labels=os.path.abspath(args.real_labels), real_top1=real_top1,
                           real_top5=real_top5, real_images=labelled)
            os.makedirs(os.path.dirname(os.path.abspath(args.results_file)), exist_ok=True)
            with open(args.results_file, "a") as f:
                f.write(json.dumps(row) + "\n")
    return stats


def scoring(num_classes: int, present, real, device):
    """evaluate()'s `on_logits`: the logits of the classes not in `present` set to -inf (None: all
    classes scored), then the batch scored by the RealScorer `real` (or None); None for neither."""
    if present is None and real is None:
        return None
    absent = None
    if present is not None:
        absent = torch.ones(num_classes, dtype=torch.bool)
        absent[present] = False
        absent = absent.to(device)

    def on_logits(logits):
        if absent is not None:
            logits = logits.masked_fill(absent, float("-inf"))
        if real is not None:
            real(logits)
        return logits
    return on_logits


def main(argv=None):
    args = get_parser().parse_args(argv)
    with exit_on_error():
        stats = evaluate_checkpoint(args)
        cleanup()
    return stats


if __name__ == "__main__":
    main()
