"""`python -m utils.export`: export a step-2 checkpoint to the packed 1-bit network, check it, or
time it against the float network; and `from utils.export import load_packed`. The network, its
file and its kernel are utils/deploy/'s (packed.py, kernel.py, block.py; latency.py times them).

    python -m utils.export --checkpoint step2/output/model_best.pth.tar --out reactnet_a_1bit.pt
    python -m utils.export --checkpoint CKPT --out FILE --verify DIR [--input-size 32]
    python -m utils.export --benchmark [--checkpoint CKPT] [--input-size 224] [--batch-sizes 1 8 64]
                           [--threads 1 N] [--rounds 5] [--kernel PATH] [--no-compile] [--no-load] [--no-layers]

Every long flag is accepted with '-' or '_' between its words (utils/cli.py).
"""
import argparse
import os

import torch

from utils.cli import Parser, check_input_size, exit_on_error
from utils.deploy import kernel, latency
from utils.deploy.packed import *  # noqa: F401,F403 -- the public names of the packed network
from utils.deploy.packed import __all__ as _packed_names
from utils.deploy.packed import export, verify

__all__ = [*_packed_names, "get_parser", "main"]


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def get_parser() -> Parser:
    p = Parser(description="Export a step-2 ReActNet-A checkpoint to packed 1-bit weights, check it, or time it.")
    p.add_argument("--checkpoint", help="step-2 checkpoint (any layout load_weights reads)")
    p.add_argument("--out", help="packed file to write")
    p.add_argument("--verify", metavar="DIR", help="after exporting, compare float and packed logits on DIR/val")
    p.add_argument("--input-size", type=int, default=None,
                   help="image side (--verify: default the training size the checkpoint records, else 224; "
                        "--benchmark: default 224)")
    p.add_argument("--benchmark", action="store_true",
                   help="time the float and packed models (weights of --checkpoint, else random)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64], help="--benchmark batch sizes")
    p.add_argument("--rounds", type=int, default=5,
                   help="--benchmark: timed rounds, float and packed alternating (median)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="--benchmark: compile the best float network (torch.compile, a minute or two)")
    p.add_argument("--load", action=argparse.BooleanOptionalAction, default=True,
                   help="--benchmark: also time the packed network at 1 and 2 threads beside a process "
                        "multiplying matrices on 2 threads")
    p.add_argument("--device", default="cpu", help="--benchmark device")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch CPU threads (default: torch's); --benchmark times each (default: 1 and torch's)")
    p.add_argument("--kernel", choices=[*kernel.PATHS, kernel.PURE],
                   help="--benchmark: the packed network's CPU path (default: the best this CPU runs)")
    p.add_argument("--layers", action=argparse.BooleanOptionalAction, default=None,
                   help="--benchmark: also time the largest binary convs alone (default: at 224x224)")
    return p


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.threads and not args.benchmark:
        if len(args.threads) > 1:
            p.error("one --threads value, except with --benchmark")
        torch.set_num_threads(args.threads[0])
    with exit_on_error():
        check_input_size(args.input_size)
        if args.benchmark:
            args.input_size = args.input_size or 224
            try:
                kernel.select(args.kernel)
            except ValueError as e:
                p.error(str(e))
            return latency.run(args)
        if not (args.checkpoint and args.out):
            p.error("exporting needs --checkpoint and --out (or pass --benchmark)")
        packed = export(args.checkpoint, args.out)
        float_size, packed_size = os.path.getsize(args.checkpoint), os.path.getsize(args.out)
        state = packed["state_dict"]
        bits = {k: v for k, v in state.items() if k.endswith(".weight_bits")}
        bits_bytes = sum(v.numel() * v.element_size() for v in bits.values())
        total_bytes = sum(v.numel() * v.element_size() for v in state.values())
        print(f"float checkpoint {args.checkpoint}: {_mb(float_size)}")
        print(f"packed file      {args.out}: {_mb(packed_size)} ({float_size / packed_size:.1f}x smaller)")
        print(f"binary weights: {len(bits)} convs, {_mb(bits_bytes)} packed, "
              f"{100 * bits_bytes / total_bytes:.1f}% of the packed tensors ({_mb(total_bytes)})")
        if args.verify:
            size = args.input_size or packed["input_size"] or 224
            r = verify(args.checkpoint, args.out, args.verify, size)
            print(f"{args.verify}/val, {r['images']} images at {size}x{size}: max relative logit error, "
                  f"packed vs float32 model {r['packed_vs_float32']:.2e} (vs the float64 model: packed "
                  f"{r['packed_vs_float64']:.2e}, float32 model {r['float32_vs_float64']:.2e}); top-1 differs "
                  f"on {r['top1_differ']} image(s); Acc@1 float {r['float_top1']:.3f}, packed {r['packed_top1']:.3f}")


if __name__ == "__main__":
    main()
