"""`python -m utils.bench precision`: how far each `--precision` mode's gradients are from float64.

Compares the student's gradients at initialization (one batch, distillation loss against the
random-weight teacher) in fp32 (TF32 off), tf32 (CUDA only) and bf16 autocast with a float64
reference: the cosine of all gradients concatenated and the smallest per-tensor cosine.
"""
import copy

import torch

from ..distill import DistributionLoss
from ..precision import PRECISIONS, autocast, using
from .common import build_models, describe_machine, fixed_images, machine_info


def student_gradients(student, teacher, images, device, precision="fp32") -> dict:
    """The student's parameter gradients (float64, CPU) of one distillation loss on `images`,
    computed as utils.engine.train_step computes them (student in train mode)."""
    student, teacher, images = student.to(device).train(), teacher.to(device).eval(), images.to(device)
    with autocast(device, precision):
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
    device = args.device
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
                with using(mode):
                    grads = student_gradients(copy.deepcopy(student), copy.deepcopy(teacher), images,
                                              device, mode)
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
