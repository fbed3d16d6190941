"""What an MoE researcher looks at while a run trains.

Every step (in the train record of metrics.jsonl):
    grad_norm_by_group   gradient norm of each parameter group (`GROUPS`),
                         after the data-parallel reduction, before clipping.
    min_over_mean_load   per MoE layer: the least-loaded expert's tokens over
                         the mean (0 = a starved expert).
Every trainer.diagnostics_every steps (a record of kind "diagnostics"):
    expert_weight_norm   (L, E) Frobenius norm of each expert's w1, w3, w2.
    topk_change_fraction per MoE layer: the fraction of a fixed probe set's
                         tokens whose set of top-k experts changed since the
                         previous diagnostics step (routing fluctuation, as in
                         StableMoE); null at the first one of a launch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moe.layer import MoELayer

from cluster.expert_parallel import is_expert_param
from cluster.fsdp import all_reduce_sharded_square_sums, is_sharded, local_part
from cluster.parallel_dims import ParallelDims

GROUPS = ("embedding", "attention", "router", "experts", "ffn", "norm")


def param_group(name: str, param: torch.Tensor) -> str:
    """The diagnostics group of a parameter: "ffn" holds dense SwiGLUs and shared experts."""
    if is_expert_param(param) or ".experts." in name:
        return "experts"
    if ".router." in name:
        return "router"
    if ".attn." in name:
        return "attention"
    if name.startswith(("embed_tokens", "lm_head")):
        return "embedding"
    if name.endswith("norm.weight"):
        return "norm"
    return "ffn"


def grad_square_sums(model: nn.Module, dims: ParallelDims) -> torch.Tensor:
    """(G,) squared gradient norm of each group of `GROUPS` of the full model, expert shards included.

    After the gradient reduction, replicated gradients are identical on all
    ranks and each expert shard is identical across its replicas, so the
    expert group is summed over the expert-parallel group and the rest is
    local. FSDP-sharded gradients (DTensors) hold each element on exactly one
    rank: their squares are summed over the world.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    device = params[0][1].grad.device
    local_G, experts_G, sharded_G = (torch.zeros(len(GROUPS), device=device, dtype=torch.float32)
                                     for _ in range(3))
    kinds = set()  # the same on every rank (it depends on the layout, not on the values)
    for name, param in params:
        group = GROUPS.index(param_group(name, param))
        square_sum = local_part(param.grad).detach().float().square().sum()
        if is_sharded(param.grad):
            sharded_G[group] += square_sum
            kinds.add("sharded")
        elif is_expert_param(param) and dims.ep > 1:
            experts_G[group] += square_sum
            kinds.add("experts")
        else:
            local_G[group] += square_sum
    if "sharded" in kinds:
        all_reduce_sharded_square_sums(sharded_G)
    if "experts" in kinds:
        dist.all_reduce(experts_G, group=dims.ep_group)
    return local_G + experts_G + sharded_G


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


@torch.no_grad()
def expert_weight_norms(model: nn.Module, dims: ParallelDims) -> torch.Tensor:
    """(L, E) norm of each expert's weights (w1, w3 and w2 together), all experts on every rank."""
    layers = moe_layers(model)
    if not layers:
        return torch.zeros(0, 0)
    num_experts = layers[0].num_experts
    shard = dims.expert_shard(num_experts) if dims.ep > 1 else slice(None)
    norms_LE = torch.zeros(len(layers), num_experts, device=layers[0].experts.w1_EDF.device)
    fsdp = is_sharded(layers[0].experts.w1_EDF)
    for i, layer in enumerate(layers):
        experts = layer.experts
        local_sq = sum(local_part(w).detach().float().square().flatten(1).sum(1)
                       for w in (experts.w1_EDF, experts.w3_EDF, experts.w2_EFD))
        norms_LE[i, shard] = local_sq
    if fsdp:  # each element of every expert lives on exactly one rank
        all_reduce_sharded_square_sums(norms_LE)
    elif dims.ep > 1:  # every rank of an expert-parallel group holds different experts
        dist.all_reduce(norms_LE, group=dims.ep_group)
    return norms_LE.sqrt().cpu()


class RoutingProbe:
    """Routing fluctuation on a fixed set of tokens.

    Every `measure` runs the model (in eval mode: no jitter, no bias-update
    counts) on the same probe batch and compares each token's set of top-k
    experts with the previous measurement. All ranks must call it together
    (expert parallelism exchanges tokens); each rank probes its own rows.
    """

    def __init__(self, input_ids: torch.Tensor, doc_ids: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.doc_ids = doc_ids
        self.previous: Optional[list[torch.Tensor]] = None

    @torch.no_grad()
    def measure(self, model: nn.Module, autocast) -> Optional[list[float]]:
        """Per MoE layer, the fraction of probe tokens whose top-k set changed; None the first time."""
        captured: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out[1].topk_ids_TK.detach()))
                 for layer in moe_layers(model)]
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            with autocast:
                model(self.input_ids.to(device), doc_ids=self.doc_ids.to(device))
        finally:
            for hook in hooks:
                hook.remove()
            model.train(was_training)
        current = [ids.sort(dim=-1).values.cpu() for ids in captured]
        previous, self.previous = self.previous, current
        if previous is None:
            return None
        return [float((old != new).any(dim=-1).float().mean()) for old, new in zip(previous, current)]
