"""The published AdamBNN recipe (the authors' run scripts), in one table-like place.

The two steps share everything but what is binary, the weight decay and where the weights start.
Every value here is a command-line default of `utils/train.py`; the README's "The original
release" section gives the sources.
"""
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#                          step 1                        step 2
STEPS = {
    1: dict(binary_weights=False, weight_decay=5e-6, save=os.path.join(ROOT, "step1", "output")),
    2: dict(binary_weights=True, weight_decay=0.0, save=os.path.join(ROOT, "step2", "output"),
            init_checkpoint=os.path.join(ROOT, "step1", "output", "model_best.pth.tar")),
}

STEP_DESCRIPTIONS = {
    1: "binary activations, real-valued weights, from scratch",
    2: "binary weights and activations, from step 1's model_best.pth.tar",
}

COMMON = dict(
    epochs=256,
    batch_size=256,          # global, split evenly over the processes
    teacher="resnet34",      # torchvision, IMAGENET1K_V1 weights
    input_size=224,
    crop_scale=0.08,         # RandomResizedCrop(input_size, scale=(crop_scale, 1))
    lighting=0.1,            # Lighting(0.1), AlexNet PCA colour jitter
)

# Learning rate by optimizer: Adam is the recipe; SGD (momentum 0.9) and AdamW are the ablations.
LEARNING_RATE = {"adam": 1.25e-3, "adamw": 1.25e-3, "sgd": 0.1}
ADAM_BETAS, ADAM_EPS, SGD_MOMENTUM = (0.9, 0.999), 1e-8, 0.9


def parameter_groups(model, weight_decay: float):
    """The original's two groups, in its order: [everything else (no decay), weights (decay)].

    "Weights" are the parameters with 4 dimensions or 'conv' in their name: the stem and the 31 block
    convolutions, and also the 78 learnable biases `move*` (shape [1, C, 1, 1]); fc, BatchNorm and
    PReLU parameters are not decayed.
    """
    decay, other = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 4 or "conv" in name else other).append(p)
    return [{"params": other}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam with coupled (L2) decay as in the original; SGD with momentum 0.9; AdamW with decoupled
    decay. The decay goes to the same group for all three; any value, negative included."""
    groups = parameter_groups(model, weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_factor(epochs: int):
    """Linear decay to 0: epoch e (0-based) trains at lr * (1 - (e + 1) / epochs).

    The original steps `LambdaLR(lambda step: 1 - step / epochs)` at the *start* of every epoch;
    this lambda, stepped at the end of every epoch, gives the same rate in every epoch without
    PyTorch's "scheduler.step() before optimizer.step()" warning.
    """
    return lambda e: 1.0 - (e + 1) / epochs


def build_scheduler(optimizer, lr: float, epochs: int, epochs_done: int = 0):
    """The linear decay as a LambdaLR positioned after `epochs_done` epochs: the next epoch, e,
    trains at lr * (1 - (e + 1) / epochs). A resumed run builds it from its current --learning_rate
    and --epochs (changed flags give the schedule they define from the current epoch on); the rate
    is LambdaLR's own closed form, so unchanged flags give exactly the uninterrupted run's."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(epochs), last_epoch=epochs_done - 1)


def set_weight_decay(optimizer, weight_decay: float) -> None:
    """The decay of the weights group (`parameter_groups`' second), e.g. a resumed run's new value."""
    optimizer.param_groups[1]["weight_decay"] = weight_decay
