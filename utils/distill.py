"""Distillation as the original does it: the frozen teacher, and the soft-target loss."""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import check_classes, detect_format, misfit, num_classes, read_checkpoint, remap_state_dict
from .distributed import broadcast_object, get_rank
from .errors import UserError

__all__ = ["DistributionLoss", "build_teacher"]


class DistributionLoss(nn.Module):
    """Cross-entropy of the student's log-softmax against the teacher's softmax (temperature 1),
    averaged over the batch: mean_b( -sum_k softmax(teacher)_bk * log_softmax(student)_bk ).

    Computed in the logits' dtype, at least float32: float32 under bf16 autocast, float64 for a
    float64 check against the original's arithmetic. The teacher's logits must not require grad:
    no gradient flows to the teacher, as in the original.
    """

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if teacher_logits.requires_grad:
            raise ValueError("the teacher's logits must not require grad (run it under no_grad)")
        dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype),
                                    torch.float32)
        target = F.softmax(teacher_logits.to(dtype), dim=1)
        log_prob = F.log_softmax(student_logits.to(dtype), dim=1)
        return -(target * log_prob).sum(dim=1).mean()


def build_teacher(name: str, weights_path: str | None, classes: int, log) -> nn.Module:
    """The frozen torchvision teacher `name`, in eval mode: the weights of `weights_path` (a
    state_dict, or a checkpoint holding one: any layout utils.checkpoint reads), or torchvision's
    ImageNet weights (IMAGENET1K_V1 where the model has them), fetched once by rank 0 while the
    others wait (offline: from TORCH_HOME's cache)."""
    import torchvision
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise UserError(f"--teacher {name!r} is not a torchvision model") from None
    if weights_path:
        state = detect_format(read_checkpoint(weights_path))[1]
        teacher_classes, source = num_classes(state, weights_path), weights_path
    else:
        enum = torchvision.models.get_model_weights(name)
        weights = getattr(enum, "IMAGENET1K_V1", None) or enum.DEFAULT
        teacher_classes, source = len(weights.meta["categories"]), f"torchvision {weights}"
    check_classes(f"the teacher ({source})", teacher_classes, classes,
                  f"pass --teacher-weights with a {classes}-class {name}")
    if not weights_path:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        failure = None
        if get_rank() == 0:  # rank 0 downloads, the others wait
            try:
                weights.get_state_dict(progress=False, check_hash=True)
            except Exception as e:  # offline, proxy, disk full, bad hash...
                failure = f"{type(e).__name__}: {e}"
        failure = broadcast_object(failure)
        if failure:
            raise UserError(f"could not fetch the teacher's weights {weights.url} ({failure}). Offline, put "
                            f"the file at {cached} (TORCH_HOME/hub/checkpoints/) or pass --teacher-weights PATH")
        state = weights.get_state_dict(progress=False, check_hash=True)
    teacher = builder(num_classes=teacher_classes)
    state = remap_state_dict(state, teacher)
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UserError(f"{source} does not fit torchvision {name} ({misfit(state, teacher)}): --teacher-weights "
                        f"takes the teacher's own weights, a {name} state_dict") from None
    log(f"=> teacher {name} from {source}")
    return teacher.eval().requires_grad_(False)
