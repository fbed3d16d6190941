"""Knowledge distillation: the loss that pulls a student's next-token distribution toward a teacher's.

Shape legend: B batch, S positions, V vocabulary.

    kd = distillation_loss(student.logits, teacher.logits, targets, temperature=2.0, kind="forward_kl")
    loss = (1 - weight) * next_token_loss + weight * kd

NOTE: the definition.
1. Both distributions are softened by the temperature T: p = softmax(z / T).
2. `forward_kl` is KL(p_teacher || p_student), Hinton et al.'s distillation
   (mass-covering: the student spreads over every token the teacher finds
   likely); `reverse_kl` is KL(p_student || p_teacher), the mode-seeking
   variant MiniLLM (Gu et al., 2024) argues suits generative students.
3. The per-position KL is averaged over the positions whose target is not
   -100 (the positions the next-token loss counts), and multiplied by T^2 so
   that its gradient keeps the scale of the next-token loss's as T changes.
Everything is computed in float32 whatever the logits' dtype (bf16 autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe.config import DISTILL_KINDS as KINDS

IGNORE_INDEX = -100


def distillation_loss(student_logits_BSV: torch.Tensor, teacher_logits_BSV: torch.Tensor,
                      targets_BS: torch.Tensor, *, temperature: float = 1.0, kind: str = "forward_kl"
                      ) -> torch.Tensor:
    """The mean temperature-scaled KL between teacher and student over the counted positions (NOTE).

    Args:
        student_logits_BSV: the student's logits (gradients flow into them).
        teacher_logits_BSV: the teacher's logits, same shape (no gradient is taken).
        targets_BS: next-token targets; positions with -100 are not counted.
        temperature: T > 0.
        kind: `forward_kl` or `reverse_kl`.
    Returns:
        A float32 scalar; 0 when no position is counted.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if student_logits_BSV.shape != teacher_logits_BSV.shape or student_logits_BSV.shape[:-1] != targets_BS.shape:
        raise ValueError(f"student logits {tuple(student_logits_BSV.shape)}, teacher logits "
                         f"{tuple(teacher_logits_BSV.shape)} and targets {tuple(targets_BS.shape)} must agree "
                         f"(the teacher must share the student's vocabulary)")
    counted_N = (targets_BS != IGNORE_INDEX).reshape(-1)
    vocab = student_logits_BSV.shape[-1]
    student_NV = F.log_softmax(student_logits_BSV.float().reshape(-1, vocab)[counted_N] / temperature, dim=-1)
    teacher_NV = F.log_softmax(teacher_logits_BSV.detach().float().reshape(-1, vocab)[counted_N] / temperature,
                               dim=-1)
    if kind == "forward_kl":
        kl_N = (teacher_NV.exp() * (teacher_NV - student_NV)).sum(-1)
    else:
        kl_N = (student_NV.exp() * (student_NV - teacher_NV)).sum(-1)
    if kl_N.numel() == 0:
        return student_logits_BSV.float().sum() * 0.0  # keeps the graph: every rank still calls backward
    return kl_N.mean() * temperature ** 2
