"""What several benchmarks use: the models and the batch they train on, waiting for the device,
the machine's description, and generated JPEGs."""
import os
import platform

import numpy as np
import torch
import torchvision
from PIL import Image

from models import reactnet_a

from .. import recipe
from ..machine import cpu_name


def build_models(step: int, num_classes: int = 1000):
    """The student of `step` (ReActNet-A, seed 0) and the teacher (ResNet-34, random weights,
    seed 1, eval mode, frozen), float32 on the CPU: the same for every mode and benchmark."""
    torch.manual_seed(0)
    student = reactnet_a(binary_weights=recipe.STEPS[step]["binary_weights"], num_classes=num_classes)
    torch.manual_seed(1)
    teacher = torchvision.models.resnet34(weights=None, num_classes=num_classes)
    teacher.eval().requires_grad_(False)
    return student, teacher


def fixed_images(batch_size: int, resolution: int) -> torch.Tensor:
    return torch.randn(batch_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(2))


def sync():
    """Wait for the GPU's queued work, so that a timer read next includes it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine_info(device: torch.device) -> dict:
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


def make_jpegs(folder: str, count: int, width: int, height: int, quality: int = 90, seed: int = 0):
    """JPEGs with photo-like content: smooth random colour fields (bicubic upsampling of a coarse
    random image), texture, shading and sensor-like noise. At 500x375 and quality 90 they average
    about 100 KiB, close to ImageNet's average training JPEG (~110 KB), so that decoding costs
    about what it costs on ImageNet."""
    rng = np.random.default_rng(seed)
    paths = []
    xx = np.mgrid[0:height, 0:width][1].astype(np.float32)  # column index, for the shading
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


def make_image_folder(root: str, images: int, width: int, height: int, quality: int, classes: int = 4) -> str:
    """root/train/<class>/*.JPEG: `images` generated JPEGs (make_jpegs) over `classes` classes."""
    for c in range(classes):
        folder = os.path.join(root, "train", f"class{c}")
        os.makedirs(folder)
        make_jpegs(folder, len(range(c, images, classes)), width, height, quality, seed=c)
    return root
