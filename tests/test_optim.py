"""The optimizer both engines build (cluster/optim.py): parameter groups, the routers' learning-rate scale."""

from __future__ import annotations

import copy

import torch
from torch.testing import assert_close

from moe import ModelConfig, MoETransformer

from cluster.optim import build_adamw, set_learning_rate
from cluster.schema import TrainerConfig

DEBUG_MODEL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16,
                   experts=dict(num_experts=4, hidden_size=32))


def _one_step(model: MoETransformer, router_lr_scale: float) -> dict[str, torch.Tensor]:
    """The parameter changes of one AdamW step at lr 1e-2 on a fixed batch."""
    optimizer = build_adamw(model, TrainerConfig(router_lr_scale=router_lr_scale))
    set_learning_rate(optimizer, 1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    (out.loss + out.aux_loss).backward()
    optimizer.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_router_lr_scale_scales_only_the_routers_update() -> None:
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**DEBUG_MODEL))
    optimizer = build_adamw(model, TrainerConfig(router_lr_scale=0.1, weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {names[id(p)]: g for g in optimizer.param_groups for p in g["params"]}
    assert set(grouped) == set(names.values()), "every parameter in exactly one group"
    for name, group in grouped.items():
        assert group["lr_scale"] == (0.1 if ".router." in name else 1.0), name
    decays = {"embed_tokens.weight": 0.0, "norm.weight": 0.0, "layers.0.attn_norm.weight": 0.0,
              "layers.0.attn.q_proj.weight": 0.1, "layers.1.ffn.experts.w2_EFD": 0.1,
              "layers.0.ffn.router.gate.weight": 0.1, "lm_head.weight": 0.1}
    for name, weight_decay in decays.items():  # matrices decay; the embedding, norms and vectors do not
        assert grouped[name]["weight_decay"] == weight_decay, name

    scaled, plain = _one_step(copy.deepcopy(model), 0.1), _one_step(copy.deepcopy(model), 1.0)
    routers = [n for n in plain if ".router." in n]
    assert routers and all(plain[n].abs().max() > 0 for n in plain if n in routers)
    for name in plain:
        expected = plain[name] * (0.1 if name in routers else 1.0)
        assert_close(scaled[name], expected, rtol=1e-4, atol=1e-9, msg=lambda m: f"{name}: {m}")
