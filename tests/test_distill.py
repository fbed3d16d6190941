"""The distillation loss against a float64 loop over positions and vocabulary, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from moe.distill import distillation_loss


def reference(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
              kind: str) -> torch.Tensor:
    """Each counted position's KL summed term by term in float64 (autograd through the student only)."""
    terms = []
    for b in range(student.shape[0]):
        for s in range(student.shape[1]):
            if targets[b, s] == -100:
                continue
            z_s, z_t = student[b, s].double() / temperature, teacher[b, s].double() / temperature
            log_p_s = z_s - torch.logsumexp(z_s, 0)
            log_p_t = z_t - torch.logsumexp(z_t, 0)
            p, log_p, log_q = ((log_p_t.exp(), log_p_t, log_p_s) if kind == "forward_kl"
                               else (log_p_s.exp(), log_p_s, log_p_t))
            terms.append(sum(p[v] * (log_p[v] - log_q[v]) for v in range(student.shape[2])))
    return torch.stack(terms).mean() * temperature ** 2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_the_loop_reference_with_gradients(kind: str, temperature: float) -> None:
    torch.manual_seed(0)
    student = torch.randn(2, 5, 7, requires_grad=True)
    teacher = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, 1] = targets[1, 4] = -100
    got = distillation_loss(student, teacher, targets, temperature=temperature, kind=kind)
    (grad,) = torch.autograd.grad(got, student)
    leaf = student.detach().double().requires_grad_(True)
    expected = reference(leaf, teacher, targets, temperature, kind)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-7, rtol=1e-5)
    assert grad[0, 1].abs().max() == 0 and grad[1, 4].abs().max() == 0, "ignored positions get no gradient"


def test_properties_and_errors() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 9)
    targets = torch.zeros(1, 4, dtype=torch.int64)
    for kind in ("forward_kl", "reverse_kl"):
        assert distillation_loss(logits, logits.clone(), targets, kind=kind).item() == pytest.approx(0, abs=1e-6)
        assert distillation_loss(logits, torch.randn(1, 4, 9), targets, kind=kind).item() > 0
    # bf16 logits (autocast on a GPU) are promoted: the value matches the float32 loss of the rounded logits.
    low = logits.to(torch.bfloat16)
    other = torch.randn(1, 4, 9).to(torch.bfloat16)
    assert distillation_loss(low, other, targets).item() == pytest.approx(
        distillation_loss(low.float(), other.float(), targets).item(), rel=1e-6)
    nothing = torch.full((1, 4), -100)
    student = logits.clone().requires_grad_(True)
    empty = distillation_loss(student, logits, nothing)
    assert empty.item() == 0 and empty.requires_grad
    with pytest.raises(ValueError, match="kind must be one of"):
        distillation_loss(logits, logits, targets, kind="js")
    with pytest.raises(ValueError, match="temperature must be positive"):
        distillation_loss(logits, logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="must share the student's vocabulary"):
        distillation_loss(logits, torch.randn(1, 4, 10), targets)
    assert math.isfinite(distillation_loss(logits * 1e4, -logits * 1e4, targets, kind="reverse_kl").item())
