"""`python -m utils.ops`: BOPs, FLOPs and OPs of ReActNet-A as the papers count them, both steps,
or the step-2 network layer by layer with its packed 1-bit form (`--summary`). The counting is
utils/deploy/opcount.py's (its docstring gives the convention).

    python -m utils.ops [--input-size 224]
    python -m utils.ops --summary [--checkpoint FILE] [--input-size 224]
"""
import os

from models import reactnet_a
from utils.cli import Parser, check_input_size, exit_on_error
from utils.deploy.opcount import *  # noqa: F401,F403 -- the counter's public names
from utils.deploy.opcount import __all__ as _counter_names
from utils.deploy.opcount import count_ops, summary
from utils.deploy.packed import build_step2_model

__all__ = [*_counter_names, "get_parser", "main", "print_summary"]


def get_parser() -> Parser:
    parser = Parser(description="BOPs, FLOPs and OPs of ReActNet-A, step 1 and step 2.")
    parser.add_argument("--input-size", type=int, default=224, help="image side in pixels, a multiple of 32")
    parser.add_argument("--summary", action="store_true",
                        help="the step-2 network layer by layer, float and packed 1-bit (utils.export)")
    parser.add_argument("--checkpoint", help="--summary: a step-2 checkpoint (its classes and file size)")
    return parser


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    side = args.input_size
    with exit_on_error():
        check_input_size(side)
        if args.summary:
            return print_summary(args.checkpoint, side)
    if args.checkpoint:
        parser.error("--checkpoint goes with --summary")
    rows = [(step, count_ops(reactnet_a(binary_weights=step == 2), (1, 3, side, side))) for step in (1, 2)]

    print(f"ReActNet-A, {side}x{side}, per image; multiply-accumulates; OPs = FLOPs + BOPs/64")
    print(f"{'step':<6}{'BOPs':>16}{'FLOPs':>16}{'OPs':>16}{'params':>13}")
    for step, c in rows:
        print(f"{step:<6}{c['bops']:>16,}{c['flops']:>16,}{c['ops']:>16,}{c['params']:>13,}")
    print("papers' notation:")
    for step, c in rows:
        print(f"{step:<6}{c['bops'] / 1e9:>15.2f}e9{c['flops'] / 1e8:>14.2f}e8{c['ops'] / 1e8:>14.2f}e8"
              f"{c['params'] / 1e6:>12.2f}M")
    print("step 1: block convs have binary inputs but real weights, counted as FLOPs;\n"
          "step 2: block convs have binary inputs and weights, counted as BOPs.")


def print_summary(checkpoint, side: int) -> None:
    model = build_step2_model(checkpoint) if checkpoint else reactnet_a(binary_weights=True)
    rows, t = summary(model, (1, 3, side, side))
    print(f"ReActNet-A step 2, {side}x{side}, per image; packed: the 1-bit file of utils.export")
    head = f"{'layer':<32}{'kind':<8}{'params':>12}{'bits':>6}{'packed bytes':>14}{'BOPs':>15}{'FLOPs':>13}"
    print(head)
    for r in rows:
        print(f"{r['layer']:<32}{r['kind']:<8}{r['params']:>12,}{r['bits']:>6}{r['packed_bytes']:>14,}"
              f"{r['bops']:>15,}{r['flops']:>13,}")
    print(f"{'total':<40}{t['params']:>12,}{'':>6}{t['packed_bytes']:>14,}{t['bops']:>15,}{t['flops']:>13,}")
    binary = [r for r in rows if r["kind"] == "binary"]
    print(f"binary weights: {sum(r['params'] for r in binary):,} of {t['params']:,} parameters "
          f"({100 * sum(r['params'] for r in binary) / t['params']:.1f}%), "
          f"{sum(r['packed_bytes'] for r in binary):,} packed bytes")
    print(f"model size: float {t['float_bytes'] / 1e6:.2f} MB, packed {t['packed_bytes'] / 1e6:.2f} MB "
          f"({t['float_bytes'] / t['packed_bytes']:.1f}x smaller); OPs = FLOPs + BOPs/64 = {t['ops']:,}")
    if checkpoint:
        print(f"{checkpoint}: {os.path.getsize(checkpoint) / 1e6:.2f} MB on disk")


if __name__ == "__main__":
    main()
