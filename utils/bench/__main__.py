"""`python -m utils.bench SUBCOMMAND`: each subcommand's flags, the defaults that depend on the
device, and the run: the table on stdout, the results as JSON with `--json PATH`. The parser and
the input-size check are utils/cli.py's."""
import argparse
import json

import torch

from ..cli import Parser, check_data_backend, check_input_size, exit_on_error
from ..data import default_workers
from ..errors import UserError
from ..precision import set_precision
from . import end_to_end, iteration, loader, precision_check


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def width_x_height(text: str) -> tuple[int, int]:
    """'500x375' -> (500, 375)."""
    try:
        width, height = (positive_int(v) for v in text.lower().split("x"))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 500x375") from None
    return width, height


def add_model_flags(p, batch_size_help: str, steps: list):
    """The flags of the subcommands that train ReActNet-A against the ResNet-34 teacher."""
    p.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where available; here %(default)s)")
    p.add_argument("--batch-size", type=positive_int, help=batch_size_help)
    p.add_argument("--steps", type=int, nargs="+", choices=(1, 2), default=steps,
                   help="the training steps to measure (1: real-valued weights, 2: binary)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads (default: torch's; here %(default)s)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of student and teacher")


def add_jpeg_flags(p, images: str):
    """The generated JPEGs' flags. Their defaults are filled in by fill_jpeg_defaults, after
    end-to-end has checked that none is given with --data."""
    p.add_argument("--images", type=positive_int, help=f"number of generated JPEGs (default: {images})")
    p.add_argument("--image-size", type=width_x_height, help="WxH of the generated JPEGs (default: 500x375)")
    p.add_argument("--quality", type=int, help="their JPEG quality (default: 90)")


def fill_jpeg_defaults(args, images: int):
    args.images = args.images or images
    args.image_size = args.image_size or (500, 375)
    args.quality = 90 if args.quality is None else args.quality


def get_parser() -> Parser:
    parser = Parser(prog="python -m utils.bench", description="Benchmarks of ReActNet-A's training "
                    "(utils/bench/__init__.py).")
    # The metavar names the public subcommands: memory-probe, internal, has no help and is not listed.
    subcommands = parser.add_subparsers(dest="subcommand", required=True,
                                        metavar="{iteration,loader,precision,end-to-end}")

    def add(name, run, description):
        p = subcommands.add_parser(name, help=description, description=description)
        p.set_defaults(run=run)
        return p

    p = add("iteration", iteration_command, "Time and peak memory of one training iteration: the "
            "original code path (baseline) against this repository's modes.")
    add_model_flags(p, "default: 16 on CPU, 256 on CUDA", steps=[1, 2])
    p.add_argument("--resolution", type=int, help="default: 128 on CPU, 224 on CUDA")
    p.add_argument("--modes", default=iteration.DEFAULT_MODES,
                   help="comma-separated: baseline, repo, or '+'-joined bf16, channels_last, compile; "
                        "baseline is measured in any case: the ratios are to it")
    p.add_argument("--compile", action="store_true", help="also measure the mode 'compile'")
    p.add_argument("--rounds", type=positive_int, default=5, help="timed iterations per mode (in turns)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per mode first")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")

    p = add("loader", loader_command, "Images/s per loader worker of the train transform, stage by "
            "stage, on generated JPEGs.")
    add_jpeg_flags(p, "64")
    p.add_argument("--input-size", type=int, default=224, help="train crop size")
    p.add_argument("--reps", type=positive_int, default=3, help="passes over the images (median)")
    p.add_argument("--train-images-per-s", type=float, help="training rate to size the workers for")

    p = add("precision", precision_command, "Gradient cosine of fp32, tf32 (CUDA) and bf16 to a "
            "float64 reference, at initialization.")
    add_model_flags(p, "default: 8 on CPU, 32 on CUDA", steps=[1, 2])
    p.add_argument("--resolution", type=int, help="default: 128 on CPU, 224 on CUDA")

    p = add("end-to-end", end_to_end_command, "Images/s of the training loop fed by each data "
            "backend, beside the model alone.")
    add_model_flags(p, "default: 16 on CPU, 256 on CUDA", steps=[2])
    p.add_argument("--input-size", type=int, default=224,
                   help="train crop size: the model's resolution")
    add_jpeg_flags(p, "4 batches")
    p.add_argument("--data", metavar="DIR", help="an ImageFolder root with train/ (default: generated JPEGs)")
    p.add_argument("-j", "--workers", type=int, default=default_workers(),
                   help="loader workers (default: the CPUs this process may use, at most 8; here %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="as training's --precision (bf16: autocast)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and batches")
    p.add_argument("--compile", action="store_true", help="torch.compile of student and teacher")
    p.add_argument("--iterations", type=positive_int, default=5, help="timed iterations per pipeline")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per pipeline first")

    for p in subcommands.choices.values():  # the four above
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    # One CPU peak-memory measurement in a fresh process: see utils/bench/iteration.py.
    p = subcommands.add_parser("memory-probe")
    p.set_defaults(run=memory_probe_command)
    p.add_argument("mode")
    p.add_argument("step", type=int, choices=(1, 2))
    for flag in ("--batch-size", "--resolution", "--threads", "--num-classes"):
        p.add_argument(flag, type=int, required=True)
    return parser


def on_device(args, cpu, cuda):
    """A default that depends on --device: `cuda` on a CUDA device, `cpu` otherwise."""
    return cuda if args.device.type == "cuda" else cpu


def set_up_torch(args):
    """Threads, and the arithmetic training runs: TF32 off (its fp32 and bf16), cuDNN autotuning."""
    torch.set_num_threads(args.threads)
    set_precision("fp32")
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def print_and_save(res: dict, table: str, json_path: str | None) -> dict:
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    return res


def iteration_command(args) -> dict:
    args.batch_size = args.batch_size or on_device(args, 16, 256)
    args.resolution = args.resolution or on_device(args, 128, 224)
    check_input_size(args.resolution, "--resolution")
    if args.compile and "compile" not in args.modes.split(","):
        args.modes += ",compile"
    set_up_torch(args)
    res = iteration.run_iteration_benchmark(args)
    return print_and_save(res, iteration.format_iteration(res), args.json)


def loader_command(args) -> dict:
    fill_jpeg_defaults(args, 64)
    res = loader.run_loader_benchmark(args)
    return print_and_save(res, loader.format_loader(res, args.train_images_per_s), args.json)


def precision_command(args) -> dict:
    args.batch_size = args.batch_size or on_device(args, 8, 32)
    args.resolution = args.resolution or on_device(args, 128, 224)
    check_input_size(args.resolution, "--resolution")
    set_up_torch(args)
    res = precision_check.run_precision_check(args)
    return print_and_save(res, precision_check.format_precision(res), args.json)


def end_to_end_command(args) -> dict:
    args.batch_size = args.batch_size or on_device(args, 16, 256)
    check_input_size(args.input_size)
    if args.data and (args.images or args.image_size or args.quality is not None):
        raise UserError("--images, --image-size and --quality describe generated JPEGs: "
                        "leave them out with --data")
    check_data_backend("torch")  # it measures both backends
    fill_jpeg_defaults(args, 4 * args.batch_size)
    set_up_torch(args)
    res = end_to_end.run_end_to_end(args)
    return print_and_save(res, end_to_end.format_end_to_end(res), args.json)


def memory_probe_command(args) -> dict:
    torch.set_num_threads(args.threads)
    set_precision("fp32")
    return iteration.print_memory_probe(args)


def main(argv=None) -> dict:
    """Run the subcommand of `argv`; returns its results."""
    with exit_on_error():
        args = get_parser().parse_args(argv)
        return args.run(args)


if __name__ == "__main__":
    main()
