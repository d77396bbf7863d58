"""The arithmetic of training and evaluation, `--precision fp32|tf32|bf16`, and the device
layout, `--channels-last` and `--compile`, in one place (their defaults: utils/cli.py).

fp32  float32 with TF32 off: the recipe's arithmetic (the authors trained on V100s, which have no
      TF32). PyTorch itself lets cuDNN convolutions use TF32 unless told otherwise.
tf32  float32 storage, TF32 tensor-core convolutions and matmuls on CUDA (Ampere and later).
bf16  bfloat16 autocast for student and teacher; weights, optimizer and loss stay float32.
"""
import contextlib

import torch

__all__ = ["PRECISIONS", "set_precision", "autocast", "using", "memory_format", "compiled"]

PRECISIONS = ("fp32", "tf32", "bf16")


def set_precision(precision: str) -> None:
    """TF32 on for 'tf32' only, for CUDA matmuls and cuDNN convolutions (no effect on a CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast on `device` for 'bf16'; nothing for the float32 modes."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def using(precision: str):
    """`set_precision(precision)` for the block, the previous TF32 switches restored after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_precision(precision)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format of the models and the batches: channels_last, or the default layout."""
    return torch.channels_last if channels_last else torch.contiguous_format


def compiled(model, backend: str):
    """torch.compile(model) with `backend`; the model itself for 'none'."""
    return model if backend == "none" else torch.compile(model, backend=backend)
