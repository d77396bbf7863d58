"""Float against packed timings for `python -m utils.export --benchmark`: the whole networks at each
batch size and thread count, and the largest binary convs alone; each pair timed in alternating
rounds (median), so that a change of the machine's load hits both alike."""
import copy
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import reactnet_a
from models.binary import BinaryConv2d, BinaryWeight
from utils.deploy import kernel
from utils.deploy.packed import PackedBinaryConv2d, build_step2_model, to_packed
from utils.machine import cpu_name, load_average

__all__ = ["benchmark", "layer_benchmark", "run"]


def _cpu_flags() -> list:
    """The flags of this CPU (Linux) that choose a path, and VNNI (int8 dot products)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vpopcntdq",
                        "avx512_vnni", "avx_vnni") if f in flags]


def _medians(calls, rounds: int, device, seconds: float = 0.0) -> list:
    """Median seconds of each of `calls` over `rounds` rounds after a warm-up round, or more rounds
    (at most 100) where they take less than about `seconds` in all; within a round the calls
    alternate, so that a change of load hits them alike."""
    def one_round():
        spent = []
        for call in calls:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            spent.append(time.perf_counter() - start)
        return spent

    with torch.no_grad():
        warm_up = one_round()
        rounds = max(rounds, min(100, int(seconds / sum(warm_up))))
        times = [one_round() for _ in range(rounds)]
    return [statistics.median(column) for column in zip(*times)]


def _per_thread_count(threads, measure) -> list:
    """[measure() with torch using n threads, for n in `threads`]; torch's setting is restored."""
    before = torch.get_num_threads()
    try:
        return [(torch.set_num_threads(n), measure())[1] for n in threads]
    finally:
        torch.set_num_threads(before)


def benchmark(model: nn.Module, batch_sizes, input_size: int, device, rounds: int, threads):
    """Yield (batch size, [(float, packed) median ms per image, for each thread count of `threads`])
    for the float step-2 `model` and its packed form, timed alternately."""
    float_model = model.eval().to(device)
    packed = to_packed(copy.deepcopy(model)).to(device)
    for batch in batch_sizes:
        x = torch.randn(batch, 3, input_size, input_size, device=device)
        yield batch, _per_thread_count(threads, lambda: tuple(
            1e3 * t / batch for t in _medians((lambda: float_model(x), lambda: packed(x)), rounds, device)))


def layer_benchmark(model: nn.Module, batch_sizes, input_size: int, device, rounds: int, threads, count: int = 4):
    """Yield (layer, batch size, [(float, packed) median ms, for each thread count of `threads`]) for
    the `count` binary convs of the step-2 `model` with the most multiply-accumulates at `input_size`
    (one of each shape), alone, over `rounds` rounds or about 0.2 s per round: the float conv of
    sign(u) with alpha * sign(W) (F.conv2d, NCHW as in the float network; sign(u) and the weight made
    beforehand) against the packed conv of u (its packing, the conv, scale and shift; channels last
    as in the packed network)."""
    layers = {}  # "3x3 512->512 14x14": (a conv of that shape, its input's height and width), in network order

    def record(conv, inputs, _):
        (h, w), k, stride = inputs[0].shape[2:], conv.kernel_size[0], conv.stride[0]
        name = f"{k}x{k} {conv.in_channels}->{conv.out_channels} {h}x{w}" + (f" stride {stride}" if stride > 1 else "")
        layers.setdefault(name, (conv, h, w))

    def macs(name):
        conv, h, w = layers[name]
        k, stride = conv.kernel_size[0], conv.stride[0]
        outputs = ((h - 1) // stride + 1) * ((w - 1) // stride + 1)  # padding k // 2
        return conv.in_channels * conv.out_channels * k * k * outputs

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, BinaryConv2d)]
    with torch.no_grad():
        model.eval().to(device)(torch.zeros(1, 3, input_size, input_size, device=device))
    for h in hooks:
        h.remove()
    for name in sorted(layers, key=macs, reverse=True)[:count]:  # sorted is stable: ties in network order
        conv, h, w = layers[name]
        with torch.no_grad():
            weight = BinaryWeight.apply(conv.weight)
        packed = PackedBinaryConv2d.fold(conv, nn.BatchNorm2d(conv.out_channels, device=device).eval())
        for batch in batch_sizes:
            u = torch.randn(batch, conv.in_channels, h, w, device=device)
            sign, u_last = torch.sign(u), u.contiguous(memory_format=torch.channels_last)
            yield name, batch, _per_thread_count(threads, lambda: tuple(1e3 * t for t in _medians(
                (lambda: F.conv2d(sign, weight, None, conv.stride, conv.padding), lambda: packed(u_last)),
                rounds, device, seconds=0.2 * rounds)))


def _print_rows(label: str, cells, path: str):
    """A float row and a packed row: ms per thread count, the packed one with its speed-up and path."""
    print(f"{'float':<8} {label} " + " | ".join(f"{f:9.2f}{'':9}" for f, _ in cells).rstrip())
    print(f"{'packed':<8} {label} " + " | ".join(f"{p:9.2f} ({f / p:5.1f}x)" for f, p in cells) + f"  {path}",
          flush=True)


def run(args):
    """`python -m utils.export --benchmark`: the tables, printed as they are measured."""
    size = args.input_size
    model = build_step2_model(args.checkpoint) if args.checkpoint else reactnet_a(binary_weights=True)
    device = torch.device(args.device)
    threads = args.threads or sorted({1, torch.get_num_threads()})
    path = kernel.active() if device.type == "cpu" else kernel.PURE
    columns = " | ".join(f"{n} thread{'s' * (n > 1)}" for n in threads)
    machine = f"{cpu_name()} ({' '.join(_cpu_flags()) or 'no AVX2'}), {os.cpu_count()} CPUs"
    print(f"ReActNet-A step 2, {size}x{size}, {args.device}: {machine}, load average {load_average()}; ms per image, "
          f"median of {args.rounds} rounds alternating float and packed, at {columns}; packed: speed-up, path")
    for batch, cells in benchmark(model, args.batch_sizes, size, device, args.rounds, threads):
        _print_rows(f"batch {batch:>4}", cells, path)
    if args.layers if args.layers is not None else size == 224:
        print(f"largest binary convs alone, ms, median of {args.rounds} rounds or more (about {0.2 * args.rounds:g} s) "
              f"alternating, at {columns} (float: F.conv2d of sign(u) and alpha * sign(W); packed: sign packing, "
              f"conv, scale and shift); load average {load_average()}")
        for name, batch, cells in layer_benchmark(model, args.batch_sizes, size, device, args.rounds, threads):
            _print_rows(f"{name:<24} batch {batch:>4}", cells, path)
