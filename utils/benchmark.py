"""Training-speed and memory benchmark: `python -m utils.benchmark` (and `--loader`).

Times one training iteration -- teacher forward (ResNet-34, random weights), student forward and
backward, the distillation loss, the Adam step -- for step 1 and step 2 of ReActNet-A, and
measures the iteration's peak memory, for

- `baseline`: the original release's code path (utils/baseline.py: binarizers through autograd
  over elementwise mask arithmetic, fp32) in the original's loop order (student forward, teacher
  forward with frozen parameters, loss, zero_grad, backward, step);
- `repo`: this repository's model through utils.engine.train_step, fp32 (the default);
- the opt-in modes of the repository model: `bf16` (autocast), `channels_last`, `compile`
  (torch.compile of the student), and combinations joined with '+', e.g. `bf16+channels_last`.

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
- CPU: each (mode, step) runs in a fresh process with MALLOC_MMAP_THRESHOLD_=65536, so that glibc
  serves every block above 64 KiB with mmap and returns it on free, and the resident set (RSS)
  tracks the live tensors. After one warm-up iteration the process resets its high-water mark
  (`echo 5 > /proc/self/clear_refs`), runs one iteration, and reports VmHWM - (VmRSS before -
  gradient bytes) from /proc/self/status.

`--loader` measures the train transform pipeline (utils.data.train_transform: JPEG decode,
RandomResizedCrop, Lighting, flip, ToTensor, Normalize) in images/s for one worker, on JPEGs it
generates.

`--precision-check` compares the student's gradients at initialization (one batch, distillation
loss against the random-weight teacher) in fp32 (TF32 off), tf32 (CUDA only) and bf16 autocast
with a float64 reference: the cosine of all gradients concatenated and the smallest per-tensor
cosine.

`--end-to-end` times the training loop (utils.engine.train_step) fed by each data backend --
`pil` (utils.data.train_loader, then the transfer) and `torch` (utils.torch_data: decode and
augmentation on the device) -- beside the same model on one pre-made batch, on generated JPEGs
or `--data DIR`. See the README's "Performance" section for measured figures.
"""
import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .data import default_workers

MiB = 2 ** 20
FEATURES = ("bf16", "channels_last", "compile")
DEFAULT_MODES = "baseline,repo,bf16,channels_last"


# ---------------------------------------------------------------------------------------------
# Set-up of one (mode, step)


def parse_mode(mode: str) -> frozenset:
    """'baseline' -> {'baseline'}; 'repo' -> {} ; 'bf16+channels_last' -> {'bf16', 'channels_last'}."""
    if mode == "baseline":
        return frozenset({"baseline"})
    parts = frozenset(p for p in mode.split("+") if p and p != "repo")
    unknown = parts - set(FEATURES)
    if unknown:
        raise SystemExit(f"error: unknown mode part(s) {sorted(unknown)} in {mode!r}: use "
                         f"'baseline', 'repo' or a '+'-joined combination of {', '.join(FEATURES)}")
    return parts


def build_models(step: int, num_classes: int = 1000):
    """The student of `step` (ReActNet-A, seed 0) and the teacher (ResNet-34, random weights,
    seed 1, eval mode, frozen), float32 on the CPU: the same for every mode and benchmark."""
    import torchvision

    from models import reactnet_a

    from . import recipe

    torch.manual_seed(0)
    student = reactnet_a(binary_weights=recipe.STEPS[step]["binary_weights"], num_classes=num_classes)
    torch.manual_seed(1)
    teacher = torchvision.models.resnet34(weights=None, num_classes=num_classes)
    teacher.eval().requires_grad_(False)
    return student, teacher


def fixed_images(batch_size: int, resolution: int) -> torch.Tensor:
    return torch.randn(batch_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(2))


class Runner:
    """Student, teacher, optimizer, loss and one fixed batch for one (mode, step); `iteration()`
    runs one training iteration on the fixed batch and waits for the device; `train(images)`
    runs one on other images (not for the baseline)."""

    def __init__(self, mode: str, step: int, batch_size: int, resolution: int, device, num_classes=1000):
        from . import recipe
        from .baseline import baseline_reactnet_a, baseline_train_step
        from .distill import DistributionLoss

        self.mode, self.step, self.device = mode, step, device
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
        self.autocast_dtype = torch.bfloat16 if "bf16" in features else None
        if "baseline" in features:
            self._step = lambda: baseline_train_step(student, teacher, self.images, self.criterion,
                                                     self.optimizer)
        else:
            self._step = lambda: self.train(self.images)
        self.batch_size = batch_size
        self.params = list(student.parameters())

    def train(self, images):
        """One training iteration (utils.engine.train_step) on `images`, as the training loop
        runs it: channels_last applied to the batch when the mode has it."""
        from .engine import train_step

        images = images.to(memory_format=self.memory_format)
        return train_step(self.model, self.teacher, images, self.criterion, self.optimizer,
                          self.autocast_dtype)

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


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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
    """CPU peak memory of one (mode, step) in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "utils.benchmark", "--memory-probe", mode, "--steps", str(step),
           "--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
           "--threads", str(args.threads), "--num-classes", str(args.num_classes),
           "--device", "cpu"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {mode} step {step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The benchmark


def machine_info(device) -> dict:
    import torchvision
    info = {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "device": device.type,
            "threads": torch.get_num_threads(), "cpu": cpu_name(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def describe_machine(m: dict) -> str:
    """One line of `machine_info`: versions, device, CPUs and threads."""
    return (f"torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}; device {m['device']}: "
            f"{m.get('gpu', m['cpu'])}; {m['cpus']} CPUs, {m['threads']} torch threads"
            + (f"; CUDA {m['cuda']}, cuDNN {m['cudnn']}" if "gpu" in m else ""))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def run_benchmark(args) -> dict:
    device = torch.device(args.device)
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


def format_results(res: dict) -> str:
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


# ---------------------------------------------------------------------------------------------
# The data pipeline


def make_jpegs(folder: str, count: int, width: int, height: int, quality: int = 90, seed: int = 0):
    """JPEGs with photo-like content: smooth random colour fields (bicubic upsampling of a coarse
    random image), texture, shading and sensor-like noise. At 500x375 and quality 90 they average
    about 100 KiB, close to ImageNet's average training JPEG (~110 KB), so that decoding costs
    about what it costs on ImageNet."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC),
                         dtype=np.float32)
        detail = rng.integers(0, 256, size=(max(1, height // 2), max(1, width // 2), 3), dtype=np.uint8)
        img += 0.6 * (np.asarray(Image.fromarray(detail, "RGB").resize((width, height), Image.BILINEAR),
                                 dtype=np.float32) - 128)
        img *= (0.7 + 0.3 * np.sin(xx / width * np.pi * rng.uniform(0.5, 2)))[..., None]
        img += rng.normal(0, 9, size=img.shape)
        path = os.path.join(folder, f"img_{i:04d}.JPEG")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(path, quality=quality)
        paths.append(path)
    return paths


def run_loader_benchmark(args) -> dict:
    """Images/s of the train transform in one process with one torch thread (as in a DataLoader
    worker), and the time of each stage of it."""
    from torchvision.datasets.folder import pil_loader  # what ImageFolder decodes with

    from . import data

    torch.set_num_threads(1)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    tf = data.train_transform(args.input_size)
    res = {"image_size": [width, height], "images": args.images, "input_size": args.input_size,
           "quality": args.quality, "cpu": cpu_name(), "torch": torch.__version__,
           "stages_ms": {}, "load_average_start": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(tmp, args.images, width, height, args.quality)
        blobs = [open(p, "rb").read() for p in paths]
        res["mean_file_kib"] = sum(map(len, blobs)) / len(blobs) / 1024

        def timed(fn, inputs, reps):
            """Median over `reps` passes of the seconds per input of `fn` over `inputs`."""
            runs = []
            for _ in range(reps):
                t = time.perf_counter()
                for x in inputs:
                    fn(x)
                runs.append(time.perf_counter() - t)
            return statistics.median(runs) / len(inputs)

        torch.manual_seed(0)
        for p in paths[:4]:
            tf(pil_loader(p))  # warm-up
        reps = args.loader_reps
        full = timed(lambda p: tf(pil_loader(p)), paths, reps)
        res["images_per_s"] = 1 / full
        # Stage by stage, on the same images.
        decoded = [pil_loader(p) for p in paths]
        rrc, lighting, flip, to_tensor, normalize = tf.transforms
        crops = [rrc(im) for im in decoded]
        lit = [lighting(im) for im in crops]
        flipped = [flip(im) for im in lit]
        tensors = [to_tensor(im) for im in flipped]
        stage = {}
        stage["decode (PIL open + convert RGB)"] = timed(pil_loader, paths, reps)
        for name, fn, inputs in (("RandomResizedCrop", rrc, decoded), ("Lighting", lighting, crops),
                                 ("RandomHorizontalFlip", flip, lit), ("ToTensor", to_tensor, flipped),
                                 ("Normalize", normalize, tensors)):
            stage[name] = timed(fn, inputs, reps)
        res["stages_ms"] = {k: 1000 * v for k, v in stage.items()}
        draft = data.draft_loader
        res["draft_images_per_s"] = 1 / timed(lambda p: tf(draft(p, args.input_size)), paths, reps)
        res["draft_decode_ms"] = 1000 * timed(lambda p: draft(p, args.input_size), paths, reps)
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


# ---------------------------------------------------------------------------------------------
# Precision: gradients of each mode against a float64 reference

@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for CUDA matmuls and cuDNN convolutions on or off, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def student_gradients(student, teacher, images, device, autocast_dtype=None) -> dict:
    """The student's parameter gradients (float64, CPU) of one distillation loss on `images`,
    computed as utils.engine.train_step computes them (student in train mode)."""
    from .distill import DistributionLoss
    from .engine import autocast

    student, teacher, images = student.to(device).train(), teacher.to(device).eval(), images.to(device)
    with autocast(device, autocast_dtype):
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = student(images)
    DistributionLoss()(logits, teacher_logits).backward()
    return {name: p.grad.detach().double().cpu() for name, p in student.named_parameters()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.flatten() @ b.flatten() / (a.norm() * b.norm()).clamp(min=1e-300)).item()


def run_precision_check(args) -> dict:
    """For each step and precision mode: the cosine of all student gradients (concatenated) to
    the float64 reference's, and the smallest per-tensor cosine, at initialization, one batch."""
    import copy

    from .train import PRECISIONS

    device = torch.device(args.device)
    res = {"machine": machine_info(device), "batch_size": args.batch_size,
           "resolution": args.resolution, "rows": []}
    for step in args.steps:
        student, teacher = build_models(step, args.num_classes)
        images = fixed_images(args.batch_size, args.resolution)
        reference = student_gradients(copy.deepcopy(student).double(), copy.deepcopy(teacher).double(),
                                      images.double(), device)
        for mode in PRECISIONS:
            row = {"step": step, "mode": mode, "cosine": None, "min_cosine": None, "min_tensor": None}
            if mode != "tf32" or device.type == "cuda":
                with tf32(mode == "tf32"):
                    grads = student_gradients(copy.deepcopy(student), copy.deepcopy(teacher), images,
                                              device, torch.bfloat16 if mode == "bf16" else None)
                row["cosine"] = cosine(torch.cat([g.flatten() for g in reference.values()]),
                                       torch.cat([g.flatten() for g in grads.values()]))
                per_tensor = {k: cosine(reference[k], grads[k]) for k in reference}
                row["min_tensor"] = min(per_tensor, key=per_tensor.get)
                row["min_cosine"] = per_tensor[row["min_tensor"]]
            res["rows"].append(row)
    return res


def format_precision(res: dict) -> str:
    m = res["machine"]
    lines = [f"gradient cosine to a float64 reference at initialization: ReActNet-A student, "
             f"ResNet-34 teacher (random weights), distillation loss, one batch of "
             f"{res['batch_size']} at {res['resolution']}x{res['resolution']}; {describe_machine(m)}", "",
             "| step | mode | cosine (all gradients) | 1 - cosine | min per-tensor cosine | tensor |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in res["rows"]:
        if r["cosine"] is None:
            lines.append(f"| {r['step']} | {r['mode']} | n/a on {m['device'].upper()} | | | |")
        else:
            lines.append(f"| {r['step']} | {r['mode']} | {r['cosine']:.6f} | {1 - r['cosine']:.1e} | "
                         f"{r['min_cosine']:.6f} | {r['min_tensor']} |")
    lines += ["", "fp32: TF32 off; tf32: TF32 on for CUDA matmuls and convolutions; bf16: autocast "
              "to bfloat16 (TF32 off)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# End to end: the training loop with each data backend


def make_image_folder(root: str, images: int, width: int, height: int, quality: int, classes: int = 4) -> str:
    """root/train/<class>/*.JPEG: `images` generated JPEGs (make_jpegs) over `classes` classes."""
    for c in range(classes):
        folder = os.path.join(root, "train", f"class{c}")
        os.makedirs(folder)
        make_jpegs(folder, len(range(c, images, classes)), width, height, quality, seed=c)
    return root


def _endless(loader):
    """The loader's batches, epoch after epoch (set_epoch called as the training loop does)."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from loader


def images_per_s(runner: Runner, batches, iterations: int, warmup: int) -> float:
    """Training images/s over `iterations` iterations on the image batches `batches` yields,
    after `warmup` untimed ones (which also start the loader's workers)."""
    for _ in range(warmup):
        runner.train(next(batches))
    sync()
    start, count = time.perf_counter(), 0
    for _ in range(iterations):
        images = next(batches)
        loss, _ = runner.train(images)
        count += images.size(0)
    loss.item()
    sync()
    return count / (time.perf_counter() - start)


def run_end_to_end(args) -> dict:
    """Images/s of the training loop fed by each data backend, beside the model alone."""
    from . import data
    from .torch_data import torch_train_loader

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    mode = "+".join(p for p, on in (("bf16", args.precision == "bf16"), ("channels_last", args.channels_last),
                                    ("compile", args.compile)) if on) or "repo"
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    res = {"machine": machine_info(device), "batch_size": args.batch_size, "input_size": args.input_size,
           "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
           "workers": args.workers,
           "iterations": args.rounds, "warmup": args.warmup, "load_average_start": load_average(),
           "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or make_image_folder(tmp, args.images, width, height, args.quality)
        res["data"] = args.data or f"{args.images} generated {width}x{height} JPEGs (quality {args.quality})"
        for step in args.steps:
            runner = Runner(mode, step, args.batch_size, args.input_size, device, args.num_classes)
            pil = data.train_loader(root, args.batch_size, args.workers, pin_memory=cuda,
                                    input_size=args.input_size)
            loader, prepare = torch_train_loader(root, args.batch_size, args.workers, pin_memory=cuda,
                                                 input_size=args.input_size)
            pipelines = {
                "model only": itertools.repeat(runner.images),
                "pil": (data.to_device(raw, device).images for raw in _endless(pil)),
                "torch": (prepare(batch, device).images for batch in _endless(loader)),
            }
            for name, batches in pipelines.items():
                row = {"step": step, "pipeline": name,
                       "images_per_s": images_per_s(runner, batches, args.rounds, args.warmup)}
                if name == "torch":
                    row["counts"] = prepare.take_counts()
                res["rows"].append(row)
            del pipelines, pil, loader  # stop the workers
    res["load_average_end"] = load_average()
    return res


def format_end_to_end(res: dict) -> str:
    m = res["machine"]
    lines = [f"end to end: training loop (utils.engine.train_step), batch {res['batch_size']} at "
             f"{res['input_size']}x{res['input_size']}, {res['precision']}"
             f"{', channels_last' if res['channels_last'] else ''}{', compile' if res['compile'] else ''}, "
             f"{res['workers']} loader workers; "
             f"{res['data']}; {res['iterations']} timed iterations after {res['warmup']} warm-up; "
             f"{describe_machine(m)}; load average {res['load_average_start']} (start), {res['load_average_end']} (end)", "",
             "| step | pipeline | images/s | vs model only |", "| --- | --- | ---: | ---: |"]
    alone = {r["step"]: r["images_per_s"] for r in res["rows"] if r["pipeline"] == "model only"}
    for r in res["rows"]:
        lines.append(f"| {r['step']} | {r['pipeline']} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s'] / alone[r['step']]:.2f}x |")
    lines += ["", "model only: the same iterations on one pre-made batch on the device; pil: "
              "utils.data.train_loader (decode and transform in the workers) + transfer; torch: "
              "utils.torch_data (workers read the bytes; decode and augment on the device; counts "
              f"{[r['counts'] for r in res['rows'] if 'counts' in r]}). The loader prefetches 4 "
              "batches per worker during the warm-up: time many more iterations than that, or the "
              "workers' share does not show."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def get_parser():
    p = argparse.ArgumentParser(description="Training-iteration speed and memory of ReActNet-A: the "
                                            "original code path against this repository's.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 16 on CPU, 256 on CUDA; --precision-check: 8 on CPU, 32 on CUDA")
    p.add_argument("--resolution", type=int, default=None, help="default: 128 on CPU, 224 on CUDA")
    p.add_argument("--steps", type=int, nargs="+", choices=(1, 2), default=None,
                   help="default: 1 2; --end-to-end: 2")
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help="comma-separated: baseline, repo, or '+'-joined bf16, channels_last, compile")
    p.add_argument("--compile", action="store_true",
                   help="also measure the mode 'compile'; --end-to-end: compile student and teacher")
    p.add_argument("--rounds", type=int, default=5, help="timed iterations per mode (in turns)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per mode first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--loader", action="store_true",
                   help="benchmark the train transform pipeline instead (images/s per worker)")
    p.add_argument("--images", type=int, default=None,
                   help="--loader, --end-to-end: number of generated JPEGs (default: 64; 4 batches)")
    p.add_argument("--image-size", default="500x375", help="--loader, --end-to-end: WxH of the generated JPEGs")
    p.add_argument("--quality", type=int, default=90, help="--loader, --end-to-end: JPEG quality")
    p.add_argument("--input-size", type=int, default=224,
                   help="--loader, --end-to-end: train crop size (the model's resolution end to end)")
    p.add_argument("--loader-reps", type=int, default=3, help="--loader: passes over the images (median)")
    p.add_argument("--train-images-per-s", type=float, default=None,
                   help="--loader: training rate to size the workers for")
    p.add_argument("--precision-check", action="store_true",
                   help="gradient cosine of fp32, tf32 (CUDA) and bf16 to a float64 reference instead")
    p.add_argument("--end-to-end", action="store_true",
                   help="images/s of the training loop fed by each data backend, beside the model alone")
    p.add_argument("--data", metavar="DIR", help="--end-to-end: an ImageFolder root with train/ "
                                                 "(default: generated JPEGs)")
    p.add_argument("-j", "--workers", type=int, default=default_workers(),
                   help="--end-to-end: loader workers")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="--end-to-end")
    p.add_argument("--channels-last", action="store_true", help="--end-to-end")
    p.add_argument("--memory-probe", metavar="MODE", help=argparse.SUPPRESS)
    return p


def report(res: dict, text: str, json_path=None) -> dict:
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    return res


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.steps = args.steps or ([2] if args.end_to_end else [1, 2])
    if args.loader:
        args.images = args.images or 64
        res = run_loader_benchmark(args)
        return report(res, format_loader(res, args.train_images_per_s), args.json)
    cuda = args.device.startswith("cuda")
    if args.batch_size is None:
        args.batch_size = (32 if cuda else 8) if args.precision_check else (256 if cuda else 16)
    if args.resolution is None:
        args.resolution = 224 if cuda else 128
    resolution = args.input_size if args.end_to_end else args.resolution
    if resolution % 32 or min(args.batch_size, resolution, args.rounds) < 1:
        raise SystemExit("error: --resolution (--input-size end to end) must be a positive multiple "
                         "of 32; --batch-size and --rounds positive")
    torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
    if args.precision_check:
        res = run_precision_check(args)
        return report(res, format_precision(res), args.json)
    if args.end_to_end:
        args.images = args.images or 4 * args.batch_size
        res = run_end_to_end(args)
        return report(res, format_end_to_end(res), args.json)
    if args.memory_probe:  # internal: one CPU peak-memory measurement in this fresh process
        runner = Runner(args.memory_probe, args.steps[0], args.batch_size, args.resolution,
                        torch.device(args.device), args.num_classes)
        print(json.dumps(cpu_iteration_peak(runner)))
        return None
    if args.compile and "compile" not in args.modes.split(","):
        args.modes += ",compile"
    res = run_benchmark(args)
    return report(res, format_results(res), args.json)


if __name__ == "__main__":
    main()
