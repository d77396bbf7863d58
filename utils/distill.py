"""The distillation loss of the original: soft-target cross-entropy, batch mean."""
import torch
import torch.nn as nn
import torch.nn.functional as F


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
