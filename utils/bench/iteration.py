"""`python -m utils.bench iteration`: the time and peak memory of one training iteration.

Times one training iteration -- teacher forward (ResNet-34, random weights), student forward and
backward, the distillation loss, the Adam step -- for step 1 and step 2 of ReActNet-A, and
measures the iteration's peak memory, for

- `baseline`: the original release's code path (utils/bench/baseline.py: binarizers through
  autograd over elementwise mask arithmetic, fp32) in the original's loop order (student forward,
  teacher forward with frozen parameters, loss, zero_grad, backward, step);
- `repo`: this repository's model through utils.engine.train_step, fp32 (the default);
- the opt-in modes of the repository model: `bf16` (autocast), `channels_last`, `compile`
  (torch.compile of student and teacher), and combinations joined with '+', e.g. `bf16+channels_last`.

All modes start from the same weights and see the same images. Timing runs the modes in turns
(round-robin, several rounds, one process) and reports the median; the ratios are this median
over the baseline's median.

Peak memory is the memory an iteration needs above the resident state without gradients
(weights, optimizer state, teacher, input batch). Gradients count in the iteration: the original
loop keeps them alive between iterations (zero_grad comes after the next forward), train_step
frees them after the step, so the gradient bytes alive before the iteration are subtracted from
the "before" figure:
- CUDA: torch.cuda.max_memory_allocated() during the iteration - (memory_allocated() before it -
  gradient bytes).
- CPU: each (mode, step) runs in a fresh process (`python -m utils.bench memory-probe`) with
  MALLOC_MMAP_THRESHOLD_=65536, so that glibc serves every block above 64 KiB with mmap and
  returns it on free, and the resident set (RSS) tracks the live tensors. After one warm-up
  iteration the process resets its high-water mark (`echo 5 > /proc/self/clear_refs`), runs one
  iteration, and reports VmHWM - (VmRSS before - gradient bytes) from /proc/self/status.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .. import recipe
from ..distill import DistributionLoss
from ..engine import train_step
from ..errors import UserError
from ..machine import load_average
from .baseline import baseline_reactnet_a, baseline_train_step
from .common import build_models, describe_machine, fixed_images, machine_info, sync

MiB = 2 ** 20
FEATURES = ("bf16", "channels_last", "compile")
DEFAULT_MODES = "baseline,repo,bf16,channels_last"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------
# Set-up of one (mode, step)


def parse_mode(mode: str) -> frozenset:
    """'baseline' -> {'baseline'}; 'repo' -> {} ; 'bf16+channels_last' -> {'bf16', 'channels_last'}."""
    if mode == "baseline":
        return frozenset({"baseline"})
    parts = frozenset(p for p in mode.split("+") if p and p != "repo")
    unknown = parts - set(FEATURES)
    if unknown:
        raise UserError(f"unknown mode part(s) {sorted(unknown)} in {mode!r}: use 'baseline', "
                        f"'repo' or a '+'-joined combination of {', '.join(FEATURES)}")
    return parts


class Runner:
    """Student, teacher, optimizer, loss and one fixed batch for one (mode, step); `iteration()`
    runs one training iteration on the fixed batch and waits for the device; `train(images)`
    runs one on other images (not for the baseline)."""

    def __init__(self, mode: str, step: int, batch_size: int, resolution: int, device, num_classes=1000):
        features = parse_mode(mode)
        student, teacher = build_models(step, num_classes)
        if "baseline" in features:
            original = baseline_reactnet_a(binary_weights=recipe.STEPS[step]["binary_weights"],
                                           num_classes=num_classes)
            original.load_state_dict(student.state_dict(), strict=True)
            student = original
        images = fixed_images(batch_size, resolution)

        self.memory_format = torch.channels_last if "channels_last" in features else torch.preserve_format
        student.to(device, memory_format=self.memory_format).train()
        teacher.to(device, memory_format=self.memory_format)
        self.images = images.to(device).contiguous(memory_format=self.memory_format)
        self.optimizer = recipe.build_optimizer(student, "adam", recipe.LEARNING_RATE["adam"],
                                                recipe.STEPS[step]["weight_decay"])
        self.criterion = DistributionLoss()
        # Both compiled, as utils/train.py does.
        self.model = torch.compile(student) if "compile" in features else student
        self.teacher = torch.compile(teacher) if "compile" in features else teacher
        self.precision = "bf16" if "bf16" in features else "fp32"
        if "baseline" in features:
            self._step = lambda: baseline_train_step(student, teacher, self.images, self.criterion,
                                                     self.optimizer)
        else:
            self._step = lambda: self.train(self.images)
        self.params = list(student.parameters())

    def train(self, images):
        """One training iteration (utils.engine.train_step) on `images`, as the training loop
        runs it: channels_last applied to the batch when the mode has it."""
        images = images.to(memory_format=self.memory_format)
        return train_step(self.model, self.teacher, images, self.criterion, self.optimizer, self.precision)

    def iteration(self) -> tuple[float, float]:
        """One iteration; returns its wall time and the process's CPU time (all threads) in seconds."""
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        loss, _ = self._step()
        loss.item()  # the loop reads the loss, as the original's progress meter does
        sync()
        return time.perf_counter() - start, time.process_time() - cpu

    def gradient_bytes(self) -> int:
        """Bytes of the parameter gradients alive now (the original loop keeps them between
        iterations; train_step frees them after the step)."""
        return sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)


# ---------------------------------------------------------------------------------------------
# Peak memory


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def cpu_iteration_peak(runner: Runner) -> dict:
    """Run in a fresh process started with MALLOC_MMAP_THRESHOLD_=65536 (see the module docstring):
    warm up, reset VmHWM, run one iteration, return VmHWM - VmRSS(before) in MiB."""
    runner.iteration()  # warm-up: optimizer state exists, compiled code is built
    before = _proc_status_kib("VmRSS")
    grads = runner.gradient_bytes() / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident-set high-water mark (VmHWM) to the current RSS
    if _proc_status_kib("VmHWM") > before + 1024:
        raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")
    runner.iteration()
    hwm = _proc_status_kib("VmHWM")
    return {"peak_mib": (hwm - (before - grads)) / 1024, "resident_before_mib": before / 1024,
            "gradients_before_mib": grads / 1024}


def cuda_iteration_peak(runner: Runner) -> dict:
    runner.iteration()
    sync()
    before = torch.cuda.memory_allocated()
    grads = runner.gradient_bytes()
    torch.cuda.reset_peak_memory_stats()
    runner.iteration()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mib": (peak - (before - grads)) / MiB, "resident_before_mib": before / MiB,
            "gradients_before_mib": grads / MiB}


def measure_memory_subprocess(mode: str, step: int, args) -> dict:
    """CPU peak memory of one (mode, step) in a fresh process (`python -m utils.bench memory-probe`,
    which prints print_memory_probe's line)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "utils.bench", "memory-probe", mode, str(step),
           "--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
           "--threads", str(args.threads), "--num-classes", str(args.num_classes)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {mode} step {step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_memory_probe(args) -> dict:
    """In the fresh process: cpu_iteration_peak of (args.mode, args.step), printed as one JSON line."""
    runner = Runner(args.mode, args.step, args.batch_size, args.resolution, torch.device("cpu"),
                    args.num_classes)
    peak = cpu_iteration_peak(runner)
    print(json.dumps(peak))
    return peak


# ---------------------------------------------------------------------------------------------
# The benchmark


def run_iteration_benchmark(args) -> dict:
    device = args.device
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        parse_mode(m)
    if "baseline" not in modes:
        modes.insert(0, "baseline")
    results = {"machine": machine_info(device), "batch_size": args.batch_size,
               "resolution": args.resolution, "rounds": args.rounds, "warmup": args.warmup,
               "load_average_start": load_average(), "rows": []}
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else (lambda s: None)
    for step in args.steps:
        runners = {}
        for mode in modes:
            log(f"[benchmark] step {step} {mode}: building and warming up ({args.warmup} iteration(s))")
            t = time.perf_counter()
            runners[mode] = Runner(mode, step, args.batch_size, args.resolution, device, args.num_classes)
            for _ in range(args.warmup):
                runners[mode].iteration()
            log(f"[benchmark]   ready in {time.perf_counter() - t:.1f} s")
        times = {m: [] for m in modes}
        cpu_times = {m: [] for m in modes}
        for r in range(args.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate the turn order
            for mode in order:
                wall, cpu = runners[mode].iteration()
                times[mode].append(wall)
                cpu_times[mode].append(cpu)
            log(f"[benchmark] step {step} round {r + 1}/{args.rounds}: " + ", ".join(
                f"{m} {1000 * times[m][-1]:.0f} ms (CPU {1000 * cpu_times[m][-1]:.0f} ms)" for m in modes))
        memory = {}
        if not args.no_memory:
            for mode in modes:
                if device.type == "cuda":
                    memory[mode] = cuda_iteration_peak(runners[mode])
                else:
                    log(f"[benchmark] step {step} {mode}: peak memory in a fresh process")
                    memory[mode] = measure_memory_subprocess(mode, step, args)
        del runners
        base_t = statistics.median(times["baseline"])
        base_c = statistics.median(cpu_times["baseline"])
        base_m = memory.get("baseline", {}).get("peak_mib")
        for mode in modes:
            med = statistics.median(times[mode])
            cpu = statistics.median(cpu_times[mode])
            peak = memory.get(mode, {}).get("peak_mib")
            results["rows"].append({
                "mode": mode, "step": step, "ms_per_iter": 1000 * med,
                "ms_all": [1000 * t for t in times[mode]],
                "cpu_ms_per_iter": 1000 * cpu, "cpu_ms_all": [1000 * t for t in cpu_times[mode]],
                "images_per_s": args.batch_size / med, "peak_mib": peak,
                "resident_before_mib": memory.get(mode, {}).get("resident_before_mib"),
                "time_ratio": med / base_t,
                "paired_time_ratio": statistics.median(t / b for t, b in zip(times[mode], times["baseline"])),
                "cpu_time_ratio": cpu / base_c,
                "memory_ratio": (peak / base_m) if peak is not None and base_m else None,
            })
    results["load_average_end"] = load_average()
    return results


def load_warning(res: dict) -> str | None:
    """A warning line when other processes competed for the CPUs during the run."""
    try:
        loads = [float(res["load_average_start"].split()[0]), float(res["load_average_end"].split()[0])]
    except (ValueError, IndexError):
        return None
    cpus = res["machine"]["cpus"] or 1
    if max(loads) > 0.75 * cpus + 1 and res["machine"]["device"] == "cpu":
        return (f"warning: load average up to {max(loads):.1f} on {cpus} CPUs: other processes competed "
                f"for the CPUs, so the times are noisy; compare the ratios, and rerun on an idle machine")
    return None


def format_iteration(res: dict) -> str:
    m = res["machine"]
    lines = [
        describe_machine(m),
        f"batch {res['batch_size']} at {res['resolution']}x{res['resolution']}, ReActNet-A student + "
        f"ResNet-34 teacher (random weights), Adam; median of {res['rounds']} iterations per mode, "
        f"modes in turns, after {res['warmup']} warm-up iteration(s); load average "
        f"{res['load_average_start']} (start), {res['load_average_end']} (end)",
    ]
    warning = load_warning(res)
    if warning:
        lines.append(warning)
    lines += [
        "",
        "| mode | step | ms/iter | images/s | peak MiB | time vs baseline | memory vs baseline "
        "| per-round time ratio | CPU ms/iter |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        mem = f"{r['memory_ratio']:.2f}x" if r["memory_ratio"] is not None else "n/a"
        lines.append(f"| {r['mode']} | {r['step']} | {r['ms_per_iter']:.0f} | {r['images_per_s']:.1f} | "
                     f"{peak} | {r['time_ratio']:.2f}x | {mem} | {r['paired_time_ratio']:.2f}x | "
                     f"{r['cpu_ms_per_iter']:.0f} |")
    lines += [
        "",
        "ms/iter: median wall time of one training iteration (teacher forward, student forward and "
        "backward, loss, Adam step); images/s from it; time vs baseline: median / baseline's median; "
        "per-round time ratio: median over the rounds of (this mode's time / the baseline's time in "
        "the same round), less sensitive to load that changes during the run. "
        "CPU ms/iter: median CPU time of the process (all threads) in an iteration. "
        "peak MiB: the memory the iteration needs above the resident state without gradients "
        "(weights, optimizer state, teacher, batch; gradients count in the iteration: " +
        ("torch.cuda.max_memory_allocated() during the iteration - (memory_allocated() before it - "
         "gradient bytes alive before it)" if m["device"] == "cuda" else
         "VmHWM - (VmRSS before - gradient bytes alive before), in a fresh process per row with "
         "MALLOC_MMAP_THRESHOLD_=65536, VmHWM reset through /proc/self/clear_refs after one warm-up "
         "iteration") + "). "
        "Ratios: mode / baseline (the original code path, fp32) at the same step.",
    ]
    return "\n".join(lines)
