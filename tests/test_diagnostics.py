"""The MoE diagnostics (cluster/diagnostics.py) on a single process, against plain recomputations.

Their expert-parallel equality with the single-process model is checked in
tests/test_expert_parallel.py (real gloo processes) and tests/test_train.py
(real Ray Train workers).
"""

from __future__ import annotations

import math

import pytest
import torch

from moe import ModelConfig, MoETransformer

from cluster.diagnostics import GROUPS, RoutingProbe, expert_weight_norms, grad_square_sums, param_group
from cluster.parallel_dims import ParallelDims

# Named tiny sizes for tests (never the real ones).
DEBUG_MODEL = dict(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=16,
                   first_k_dense=1, dense_hidden_size=48)
SINGLE = ParallelDims(1, 1)


def debug_model(**router) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(**DEBUG_MODEL, router=dict(top_k=2, **router),
                                      experts=dict(num_experts=4, hidden_size=16, num_shared_experts=1)))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (3, 17), generator=gen)
    doc_ids = torch.zeros(3, 16, dtype=torch.long)
    return tokens[:, :-1], doc_ids, tokens[:, 1:]


def test_param_groups_name_every_parameter() -> None:
    groups = {name: param_group(name, p) for name, p in debug_model().named_parameters()}
    assert groups["embed_tokens.weight"] == groups["lm_head.weight"] == "embedding"
    assert groups["layers.0.attn.q_proj.weight"] == "attention"
    assert groups["layers.0.ffn.w1.weight"] == "ffn", "a dense layer's SwiGLU"
    assert groups["layers.1.ffn.shared_experts.w2.weight"] == "ffn", "shared experts are dense"
    assert groups["layers.1.ffn.experts.w1_EDF"] == groups["layers.2.ffn.experts.w2_EFD"] == "experts"
    assert groups["layers.2.ffn.router.gate.weight"] == "router"
    assert groups["layers.2.ffn_norm.weight"] == groups["norm.weight"] == "norm"
    assert set(groups.values()) == set(GROUPS)


def test_grad_square_sums_match_a_per_parameter_loop() -> None:
    model = debug_model(z_loss_coef=1e-3)
    inputs, doc_ids, targets = batch()
    out = model(inputs, doc_ids=doc_ids, targets=targets)
    (out.loss + out.aux_loss).backward()
    expected = {group: 0.0 for group in GROUPS}
    for name, param in model.named_parameters():
        expected[param_group(name, param)] += float(param.grad.double().square().sum())
    sums_G = grad_square_sums(model, SINGLE)
    assert sums_G.shape == (len(GROUPS),)
    for group, value in zip(GROUPS, sums_G.tolist()):
        assert value == pytest.approx(expected[group], rel=1e-5), group
        assert value > 0, f"{group}: every group has a gradient here"
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert math.sqrt(float(sums_G.sum())) == pytest.approx(float(total), rel=1e-5)


def test_expert_weight_norms_are_per_expert_frobenius_norms() -> None:
    model = debug_model()
    norms_LE = expert_weight_norms(model, SINGLE)
    assert norms_LE.shape == (2, 4)
    layer = model.layers[2].ffn.experts
    for expert in range(4):
        parts = [layer.w1_EDF[expert], layer.w3_EDF[expert], layer.w2_EFD[expert]]
        expected = math.sqrt(sum(float(w.detach().double().square().sum()) for w in parts))
        assert float(norms_LE[1, expert]) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        layer.w2_EFD[3].mul_(3.0)
    assert float(expert_weight_norms(model, SINGLE)[1, 3]) > float(norms_LE[1, 3])
    assert torch.equal(expert_weight_norms(model, SINGLE)[0], norms_LE[0]), "other layers unchanged"


def test_routing_probe_counts_changed_top_k_sets_and_leaves_training_state_alone() -> None:
    model = debug_model(bias_update_rate=0.01, jitter_eps=0.1)
    model.train()
    inputs, doc_ids, _ = batch()
    probe = RoutingProbe(inputs, doc_ids)
    assert probe.measure(model, torch.autocast("cpu", enabled=False)) is None, "nothing to compare with yet"
    assert model.training, "the probe restores training mode"
    assert probe.measure(model, torch.autocast("cpu", enabled=False)) == [0.0, 0.0], \
        "eval mode: no jitter, the same routing twice"
    routers = [model.layers[i].ffn.router for i in (1, 2)]
    assert all(float(r.tokens_per_expert.sum()) == 0 for r in routers), "probes are not counted for the bias"

    # The last MoE layer's router negated: with 2 of 4 experts, every token's top-2 becomes its bottom-2
    # (disjoint sets); the first MoE layer sees the same inputs and routes as before.
    with torch.no_grad():
        routers[1].gate.weight.neg_()
    assert probe.measure(model, torch.autocast("cpu", enabled=False)) == [0.0, 1.0]
    with torch.no_grad():
        routers[0].gate.weight.neg_()
    assert probe.measure(model, torch.autocast("cpu", enabled=False))[0] == 1.0
