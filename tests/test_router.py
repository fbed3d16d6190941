"""Routing and balancing losses against float64 loop references."""

from __future__ import annotations

import math

import pytest
import torch

from moe import RouterConfig, update_expert_bias
from moe.router import Router, router_z_loss, sequence_balance_loss, switch_load_balancing_loss


def make_router(num_experts: int = 6, hidden: int = 8, **cfg) -> Router:
    torch.manual_seed(0)
    return Router(hidden, num_experts, RouterConfig(**cfg)).double()


def test_switch_loss_matches_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 5, generator=gen, dtype=torch.float64), -1)
    ids = torch.topk(probs, 2, -1).indices
    num_tokens, num_experts = probs.shape
    expected = 0.0
    for e in range(num_experts):
        f_e = sum(int(ids[t, k] == e) for t in range(num_tokens) for k in range(2)) / num_tokens
        p_e = sum(float(probs[t, e]) for t in range(num_tokens)) / num_tokens
        expected += f_e * p_e
    expected *= num_experts
    assert math.isclose(switch_load_balancing_loss(probs, ids).item(), expected, rel_tol=1e-12)


def test_switch_loss_is_one_for_perfect_balance() -> None:
    probs = torch.full((8, 4), 0.25, dtype=torch.float64)
    ids = torch.arange(8).remainder(4).unsqueeze(1)
    assert switch_load_balancing_loss(probs, ids).item() == pytest.approx(1.0)


def test_sequence_balance_loss_matches_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    batch, seq_len, num_experts, top_k = 3, 10, 6, 2
    scores = torch.sigmoid(torch.randn(batch, seq_len, num_experts, generator=gen, dtype=torch.float64))
    ids = torch.topk(scores, top_k, -1).indices
    total = 0.0
    for b in range(batch):
        for e in range(num_experts):
            count = sum(int(ids[b, t, k] == e) for t in range(seq_len) for k in range(top_k))
            f = num_experts / (top_k * seq_len) * count
            p = sum(float(scores[b, t, e] / scores[b, t].sum()) for t in range(seq_len)) / seq_len
            total += f * p
    assert math.isclose(sequence_balance_loss(scores, ids).item(), total / batch, rel_tol=1e-12)


def test_z_loss_matches_formula() -> None:
    logits = torch.randn(7, 5, dtype=torch.float64)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 7
    assert math.isclose(router_z_loss(logits).item(), expected, rel_tol=1e-12)


def test_aux_loss_is_weighted_sum_of_enabled_losses() -> None:
    router = make_router(aux_loss_coef=0.1, seq_aux_loss_coef=0.2, z_loss_coef=0.3)
    out = router(torch.randn(2, 5, 8, dtype=torch.float64))
    expected = 0.1 * out.losses["load_balancing"] + 0.2 * out.losses["sequence_balance"] + 0.3 * out.losses["z_loss"]
    torch.testing.assert_close(out.aux_loss, expected)
    assert make_router(aux_loss_coef=0.0)(torch.randn(1, 3, 8, dtype=torch.float64)).aux_loss.item() == 0


@pytest.mark.parametrize("score_func,renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_gate_weights(score_func: str, renormalize: bool) -> None:
    router = make_router(score_func=score_func, renormalize=renormalize, top_k=3, route_scale=2.5)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    out = router(x)
    logits = router.gate(x.reshape(-1, 8))
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    chosen = scores.gather(1, out.topk_ids_TK)
    assert torch.equal(out.topk_ids_TK, torch.topk(scores, 3, -1).indices)
    if renormalize:
        chosen = chosen / chosen.sum(-1, keepdim=True)
    torch.testing.assert_close(out.topk_weights_TK, 2.5 * chosen)


def test_expert_bias_changes_selection_not_gate_weights() -> None:
    router = make_router(score_func="sigmoid", bias_update_rate=0.01, top_k=2)
    x = torch.randn(1, 16, 8, dtype=torch.float64)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0]))
    out = router(x)
    assert torch.all((out.topk_ids_TK == 5).any(-1)), "a large bias must force expert 5 into every top-k"
    scores = torch.sigmoid(router.gate(x.reshape(-1, 8)))
    chosen = scores.gather(1, out.topk_ids_TK)
    torch.testing.assert_close(out.topk_weights_TK, chosen / chosen.sum(-1, keepdim=True))


def test_expert_bias_update_rule_and_reduction() -> None:
    model = torch.nn.ModuleList([make_router(num_experts=4, bias_update_rate=0.05, score_func="sigmoid"),
                                 make_router(num_experts=4, aux_loss_coef=0.01)])
    model.train()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    counts = model[0](x).stats["tokens_per_expert"].clone()
    model[0](x)  # counts accumulate over micro-batches
    torch.testing.assert_close(model[0].tokens_per_expert, 2 * counts.float())
    assert model[1].tokens_per_expert.sum() == 0, "routers without aux-free balancing count nothing"

    seen = []

    def fake_all_reduce(t: torch.Tensor) -> None:  # stands for a sum over 3 identical ranks
        seen.append(t.shape)
        t.mul_(3)

    reduced = update_expert_bias(model, all_reduce=fake_all_reduce)
    assert seen == [torch.Size([1, 4])], "one collective for all aux-free routers"
    loads = 6 * counts.float()
    torch.testing.assert_close(reduced[0], loads)
    expected_bias = 0.05 * torch.sign(loads.mean() - loads)
    torch.testing.assert_close(model[0].expert_bias, expected_bias)
    assert model[0].tokens_per_expert.sum() == 0, "counts reset after the update"

    model.eval()
    model[0](x)
    assert model[0].tokens_per_expert.sum() == 0, "evaluation does not count"


def test_aux_free_balancing_reduces_imbalance() -> None:
    """The bias update alone (no aux loss) drives a skewed router towards balance."""
    router = make_router(num_experts=4, score_func="sigmoid", bias_update_rate=0.02, aux_loss_coef=0.0, top_k=1)
    with torch.no_grad():
        router.gate.weight[0] += 1.0
    router.train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 512, 8, generator=gen, dtype=torch.float64).abs()
    first = router(x).stats["max_over_mean_load"].item()
    for _ in range(200):
        router(x)
        update_expert_bias(router)
    last = router(x).stats["max_over_mean_load"].item()
    assert first > 2.0 and last < 1.3, (first, last)


def test_jitter_only_in_training() -> None:
    router = make_router(jitter_eps=0.5)
    x = torch.randn(1, 64, 8, dtype=torch.float64)
    router.eval()
    a, b = router(x).topk_weights_TK, router(x).topk_weights_TK
    assert torch.equal(a, b)
    router.train()
    assert not torch.equal(router(x).topk_weights_TK, router(x).topk_weights_TK)


def test_router_stats() -> None:
    router = make_router(num_experts=4, top_k=2)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    out = router(x)
    stats = out.stats
    assert stats["tokens_per_expert"].sum() == 30
    assert torch.equal(stats["tokens_per_expert"], torch.bincount(out.topk_ids_TK.reshape(-1), minlength=4).float())
    assert stats["max_over_mean_load"] == stats["max_load"] / stats["mean_load"]
    probs = torch.softmax(router.gate(x.reshape(-1, 8)), -1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(stats["router_entropy"].double(), entropy, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs,field", [
    (dict(top_k=0), "top_k"), (dict(score_func="tanh"), "score_func"), (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(drop_policy="random"), "drop_policy"), (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    (dict(jitter_eps=1.5), "jitter_eps"),
])
def test_router_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"RouterConfig.{field}"):
        RouterConfig(**kwargs)


def test_gate_runs_in_float32_under_bf16_autocast() -> None:
    """Under bf16 autocast (GPU training) the gate GEMM stays float32: the routing equals the float32 one."""
    router = make_router(top_k=2).float()
    x = torch.randn(2, 64, 8)
    reference = router(x, return_probs=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = router(x, return_probs=True)
    assert mixed.probs_TE.dtype == torch.float32
    torch.testing.assert_close(mixed.probs_TE, reference.probs_TE, rtol=1e-6, atol=1e-7)
    assert torch.equal(mixed.topk_ids_TK, reference.topk_ids_TK)
