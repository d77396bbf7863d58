"""`python -m utils.export --benchmark`: the packed network against the float network as a user would
deploy it, whole, at each batch size and thread count; the packed network at 2 threads against 1
beside another process that multiplies matrices on 2 threads; and the largest binary convs alone.
Each comparison is timed in alternating rounds in one process (median), so that a change of the
machine's load hits all alike, and printed with the machine, the versions and the date.

The float networks: "eager" is models.reactnet as trained (torch.no_grad); "best" has alpha * sign(W)
computed once, each BatchNorm folded into its conv, channels_last memory, and is compiled by
torch.compile (inductor, freezing on), the fastest float32 form of it found on a CPU.
"""
import copy
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import reactnet_a
from models.binary import BinaryConv2d, BinaryWeight
from utils.deploy import kernel
from utils.deploy.packed import PackedBinaryConv2d, build_step2_model, to_packed
from utils.machine import cpu_name, load_average

__all__ = ["FoldedNetwork", "benchmark", "under_load", "layer_benchmark", "run"]

# Seconds idle before each timed call: PyTorch's OpenMP threads spin for milliseconds after an
# operation, and would take a core from the next call (the packed network's threads above all).
REST = 0.05
# The other process of the under-load case: 2-thread float matrix products, for at most 10 minutes.
LOAD = ("import time, torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nend = time.time() + 600\n"
        "while time.time() < end:\n    a @ a\n")


def _cpu_flags() -> list:
    """The flags of this CPU (Linux) that choose a path, and VNNI (int8 dot products)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vpopcntdq",
                        "avx512_vnni", "avx_vnni") if f in flags]


def _fold(conv, bn, weight) -> tuple:
    """(weight, bias) of conv with `weight` followed by eval-mode BatchNorm `bn`."""
    scale = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
    return (weight * scale.view(-1, 1, 1, 1)).contiguous(), bn.bias.detach() - bn.running_mean * scale


class _FoldedBlock(nn.Module):
    """models.reactnet.BasicBlock with alpha * sign(W) and its BatchNorms folded into the convs."""

    def __init__(self, block):
        super().__init__()
        self.stride, self.same = block.stride, block.inplanes == block.planes
        signed = lambda conv: BinaryWeight.apply(conv.weight.detach())  # noqa: E731
        self.w3, self.b3 = _fold(block.binary_3x3, block.bn1, signed(block.binary_3x3))
        pairs = ([(block.binary_pw, block.bn2)] if self.same else
                 [(block.binary_pw_down1, block.bn2_1), (block.binary_pw_down2, block.bn2_2)])
        weights, biases = zip(*(_fold(conv, bn, signed(conv)) for conv, bn in pairs))
        self.w1, self.b1 = torch.cat(weights), torch.cat(biases)
        self.moves = [getattr(block, f"move{i}").bias.detach() for i in (11, 12, 13, 21, 22, 23)]
        self.slopes = (block.prelu1.weight.detach(), block.prelu2.weight.detach())

    def forward(self, x):
        move11, move12, move13, move21, move22, move23 = self.moves
        out1 = F.conv2d(torch.sign(x + move11), self.w3, self.b3, self.stride, 1)
        out1 = F.prelu(out1 + (F.avg_pool2d(x, 2) if self.stride == 2 else x) + move12, self.slopes[0]) + move13
        out2 = F.conv2d(torch.sign(out1 + move21), self.w1, self.b1)
        out2 = out2 + (out1 if self.same else torch.cat([out1, out1], 1)) + move22
        return F.prelu(out2, self.slopes[1]) + move23


class FoldedNetwork(nn.Module):
    """A float step-2 ReActNet-A for inference only: alpha * sign(W) computed once and each BatchNorm
    folded into its conv (the same network up to float32 rounding), channels_last memory."""

    def __init__(self, model):
        super().__init__()
        stem = model.feature[0]
        self.stem_weight, self.stem_bias = _fold(stem.conv1, stem.bn1, stem.conv1.weight.detach())
        self.blocks = nn.Sequential(*(_FoldedBlock(block) for block in model.feature[1:]))
        self.fc = copy.deepcopy(model.fc)

    def forward(self, x):
        x = F.conv2d(x.contiguous(memory_format=torch.channels_last), self.stem_weight, self.stem_bias, 2, 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(x), 1), 1))


def _medians(calls, rounds: int, device, seconds: float = 0.0) -> list:
    """Median seconds of each of `calls` over `rounds` rounds after a warm-up round, or more rounds
    (at most 100) where they take less than about `seconds` in all; within a round the calls
    alternate, so that a change of load hits them alike, each after REST seconds idle."""
    def one_round():
        spent = []
        for call in calls:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            time.sleep(REST)
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            spent.append(time.perf_counter() - start)
        return spent

    with torch.no_grad():
        warm_up = one_round()
        rounds = max(rounds, min(100, int(seconds / (sum(warm_up) + REST * len(calls)))))
        times = [one_round() for _ in range(rounds)]
    return [statistics.median(column) for column in zip(*times)]


def _at_threads(n: int, call):
    """call, with torch using n threads (the packed network's kernel too)."""
    def timed():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return call()
        finally:
            torch.set_num_threads(before)
    return timed


def benchmark(model: nn.Module, batch_sizes, input_size: int, device, rounds: int, threads, compile: bool = True):
    """Yield (batch size, {thread count: (float eager, float best, packed) median ms per image}) for
    the float step-2 `model` and its packed form, all timed alternately in each round (each thread
    count of `threads` in turn)."""
    eager = model.eval().to(device)
    best = FoldedNetwork(eager).eval()
    if compile:
        import torch._inductor.config as inductor
        inductor.freezing = True  # the weights are constants: folded and laid out once
        best = torch.compile(best)
    packed = to_packed(copy.deepcopy(model)).to(device)
    for batch in batch_sizes:
        x = torch.randn(batch, 3, input_size, input_size, device=device)
        calls = [_at_threads(n, lambda f=f: f(x)) for n in threads for f in (eager, best, packed)]
        ms = [1e3 * t / batch for t in _medians(calls, rounds, device)]
        yield batch, {n: tuple(ms[3 * i:3 * i + 3]) for i, n in enumerate(threads)}


def under_load(model: nn.Module, batch_sizes, input_size: int, rounds: int):
    """Yield (batch size, packed median ms per image at 1 thread, at 2 threads), timed alternately
    while another process (LOAD) multiplies matrices on 2 threads."""
    packed = to_packed(copy.deepcopy(model))
    load = subprocess.Popen([sys.executable, "-c", LOAD])
    try:
        time.sleep(2)  # its torch imported, its threads at work
        for batch in batch_sizes:
            x = torch.randn(batch, 3, input_size, input_size)
            one, two = _medians([_at_threads(n, lambda: packed(x)) for n in (1, 2)], rounds, torch.device("cpu"))
            yield batch, 1e3 * one / batch, 1e3 * two / batch
    finally:
        load.kill()
        load.wait()


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
            calls = [_at_threads(n, f) for n in threads for f in (
                lambda: F.conv2d(sign, weight, None, conv.stride, conv.padding), lambda: packed(u_last))]
            ms = [1e3 * t for t in _medians(calls, rounds, device, seconds=0.2 * rounds)]
            yield name, batch, [tuple(ms[2 * i:2 * i + 2]) for i in range(len(threads))]


def run(args):
    """`python -m utils.export --benchmark`: the tables, printed as they are measured."""
    size = args.input_size
    model = build_step2_model(args.checkpoint) if args.checkpoint else reactnet_a(binary_weights=True)
    device = torch.device(args.device)
    threads = args.threads or sorted({1, torch.get_num_threads()})
    path = kernel.active() if device.type == "cpu" else kernel.PURE
    best = "compiled" if args.compile else "not compiled (--no-compile)"
    print(f"ReActNet-A step 2, {size}x{size}, {args.device}: {cpu_name()} ({' '.join(_cpu_flags()) or 'no AVX2'}), "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}; {datetime.datetime.now():%Y-%m-%d %H:%M}; load average "
          f"{load_average()}; weights {args.checkpoint or 'random'}; packed: path {path}")
    print(f"ms per image, median of {args.rounds} rounds, each round alternating every column; float eager: as "
          f"trained; float best: alpha*sign(W) and BatchNorm folded, channels_last, {best}", flush=True)
    print(f"{'threads':>7} {'batch':>5} {'float eager':>11} {'float best':>10} {'packed':>8}  "
          f"{'packed vs best':>14} {'vs eager':>8}")
    for batch, cells in benchmark(model, args.batch_sizes, size, device, args.rounds, threads, args.compile):
        for n, (eager, best_ms, packed) in cells.items():
            print(f"{n:>7} {batch:>5} {eager:>11.2f} {best_ms:>10.2f} {packed:>8.2f}  {best_ms / packed:>13.1f}x "
                  f"{eager / packed:>7.1f}x")
        if len(cells) > 1:
            one, most = cells[min(cells)][2], cells[max(cells)][2]
            print(f"{'':>7} {batch:>5} packed, {min(cells)} thread{'s' * (min(cells) > 1)} / {max(cells)} threads: "
                  f"{one / most:.2f}x", flush=True)
    if args.load and device.type == "cpu":
        print(f"packed, beside another process multiplying 1024x1024 float matrices on 2 threads: ms per image, "
              f"median of {args.rounds} rounds alternating 1 and 2 threads; load average {load_average()}")
        for batch, one, two in under_load(model, args.batch_sizes, size, args.rounds):
            print(f"{'':>7} {batch:>5} 1 thread {one:8.2f}  2 threads {two:8.2f}  2 threads take {two / one:.2f}x "
                  f"the time of 1", flush=True)
    if args.layers if args.layers is not None else size == 224:
        columns = " | ".join(f"{n} thread{'s' * (n > 1)}" for n in threads)
        print(f"largest binary convs alone, ms, median of {args.rounds} rounds or more (about {0.2 * args.rounds:g} s) "
              f"alternating, at {columns} (float: F.conv2d of sign(u) and alpha * sign(W); packed: sign packing, "
              f"conv, scale and shift); load average {load_average()}")
        for name, batch, cells in layer_benchmark(model, args.batch_sizes, size, device, args.rounds, threads):
            label = f"{name:<24} batch {batch:>4}"
            print(f"{'float':<8} {label} " + " | ".join(f"{f:9.2f}{'':9}" for f, _ in cells).rstrip())
            print(f"{'packed':<8} {label} " + " | ".join(f"{p:9.2f} ({f / p:5.1f}x)" for f, p in cells) + f"  {path}",
                  flush=True)
