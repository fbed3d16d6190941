"""Token-choice top-k routing and its load-balancing terms.

Shape legend: B batch, S sequence, T tokens (B*S), D hidden, E experts,
K experts per token (top_k), L MoE layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import RouterConfig


@dataclass
class RouterOutput:
    """What the router hands to the dispatcher and to the model.

    topk_ids_TK holds -1 for assignments dropped by the capacity limit; their
    gate weight in topk_weights_TK is 0.
    """

    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    aux_loss: torch.Tensor  # weighted sum of this layer's balancing losses (scalar)
    losses: dict[str, torch.Tensor]  # each unweighted loss, detached, for logging
    stats: dict[str, torch.Tensor]  # detached load statistics, see `load_stats`
    # Detached per-token probabilities over experts (softmax scores, or sigmoid
    # scores normalised to sum to 1), only when asked for (`return_probs`).
    probs_TE: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class ScoreFunction:
    """How the gate's logits become expert scores, and the scores a distribution over experts.

    Chosen once when the router is built (`SCORE_FUNCTIONS[config.score_func]`), so `forward` never branches
    on the name.
    """

    scores: Callable[[torch.Tensor, torch.dtype], torch.Tensor]  # (logits_TE, dtype) -> scores_TE
    distribution: Callable[[torch.Tensor], torch.Tensor]  # scores_TE -> probabilities summing to 1 per token
    renormalize_topk: bool  # the top-k weights always sum to 1 (sigmoid scores do not otherwise)


SCORE_FUNCTIONS = {
    "softmax": ScoreFunction(lambda logits, dtype: torch.softmax(logits, dim=-1, dtype=dtype),
                             lambda scores: scores, renormalize_topk=False),
    "sigmoid": ScoreFunction(lambda logits, dtype: torch.sigmoid(logits.to(dtype)),
                             lambda scores: scores / scores.sum(dim=-1, keepdim=True), renormalize_topk=True),
}


def switch_load_balancing_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary loss `E * sum_i f_i * P_i` (unweighted).

    f_i is the number of assignments to expert i divided by the number of
    tokens (so sum_i f_i = K) and P_i the mean router probability of expert i,
    exactly as transformers' `load_balancing_loss_func` computes them.
    Dropped assignments (id -1) still count: the router chose them.
    """
    num_tokens, num_experts = probs_TE.shape
    ids = topk_ids_TK.clamp_min(0).reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=probs_TE.dtype, device=probs_TE.device)
    counts_E.index_add_(0, ids, torch.ones_like(ids, dtype=probs_TE.dtype))
    f_E = counts_E / num_tokens
    p_E = probs_TE.mean(dim=0)
    return num_experts * (f_E * p_E).sum()


def sequence_balance_loss(probs_BSE: torch.Tensor, topk_ids_BSK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2/V3 sequence-wise balance loss (unweighted), averaged over sequences.

    Per sequence: f_i = E / (K * S) * #assignments to i, P_i = mean over the
    sequence of the normalised scores s_i / sum_j s_j; loss = sum_i f_i * P_i.
    """
    batch, seq_len, num_experts = probs_BSE.shape
    top_k = topk_ids_BSK.shape[-1]
    ids = topk_ids_BSK.clamp_min(0).reshape(batch, seq_len * top_k)
    counts_BE = torch.zeros(batch, num_experts, dtype=probs_BSE.dtype, device=probs_BSE.device)
    counts_BE.scatter_add_(1, ids, torch.ones_like(ids, dtype=probs_BSE.dtype))
    f_BE = counts_BE * (num_experts / (top_k * seq_len))
    normalized_BSE = probs_BSE / probs_BSE.sum(dim=-1, keepdim=True)
    p_BE = normalized_BSE.mean(dim=1)
    return (f_BE * p_BE).sum(dim=-1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss `mean(logsumexp(logits)^2)` (unweighted)."""
    logits_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def capacity_keep_mask(topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, num_experts: int,
                       capacity: int, drop_policy: str) -> torch.Tensor:
    """Which assignments fit in their expert's capacity.

    NOTE: an assignment's rank inside its expert is found with two stable
    sorts: first by the priority (gate weight descending for "probs", token
    position for "position"), then by expert id. In the resulting order each
    expert's assignments are contiguous and ordered by priority, so the rank is
    the position minus the expert's start offset.
    """
    flat_ids = topk_ids_TK.reshape(-1)
    if drop_policy == "probs":
        priority_order = torch.argsort(topk_weights_TK.reshape(-1).detach(), descending=True, stable=True)
    else:  # "position": token order, slot order within a token
        priority_order = torch.arange(flat_ids.numel(), device=flat_ids.device)
    by_expert = torch.argsort(flat_ids[priority_order], stable=True)
    order = priority_order[by_expert]
    counts_E = count_per_expert(flat_ids, num_experts)  # not bincount: no device-to-host sync
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted = torch.arange(order.numel(), device=flat_ids.device) - starts_E[flat_ids[order]]
    keep = torch.empty_like(flat_ids, dtype=torch.bool)
    keep[order] = rank_sorted < capacity
    return keep.view_as(topk_ids_TK)


def count_per_expert(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64 count of each expert id in `ids`; negative ids (dropped) are not counted.

    A scatter-add, not `bincount`: its output shape does not depend on the
    values, so torch.compile traces it without a graph break.
    """
    flat = ids.reshape(-1)
    kept = (flat >= 0).to(torch.int64)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat.clamp_min(0), kept)


def load_stats(topk_ids_TK: torch.Tensor, probs_TE: torch.Tensor, dropped_fraction: torch.Tensor,
               num_experts: int) -> dict[str, torch.Tensor]:
    """Detached per-layer statistics: tokens per expert (after dropping), the
    dropped fraction, the mean router entropy and max/mean expert load."""
    tokens_per_expert = count_per_expert(topk_ids_TK, num_experts).float()
    mean_load = tokens_per_expert.mean().clamp_min(1e-9)
    probs = probs_TE.detach().float()
    probs = probs / probs.sum(dim=-1, keepdim=True)
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1).mean()
    return {
        "tokens_per_expert": tokens_per_expert,
        "dropped_fraction": dropped_fraction.detach().float(),
        "router_entropy": entropy,
        "max_load": tokens_per_expert.max(),
        "mean_load": tokens_per_expert.mean(),
        "max_over_mean_load": tokens_per_expert.max() / mean_load,
    }


class Router(nn.Module):
    """Top-k token-choice router with all balancing methods of `RouterConfig`.

    Buffers:
        expert_bias: auxiliary-loss-free selection bias (DeepSeek-V3). Added to
            the scores only to choose experts, never to the gate weights.
            Persistent: it is part of the trained model.
        tokens_per_expert: assignments counted since the last bias update
            (training only); reduced across data-parallel ranks and consumed
            by `update_expert_bias`.
    """

    def __init__(self, hidden_size: int, num_experts: int, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.score_function = SCORE_FUNCTIONS[config.score_func]
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        # True while activation checkpointing recomputes this router's block: the
        # tokens were already counted by the original forward pass.
        self.recomputing = False

    def _apply(self, fn, recurse=True):
        # Casting the model (e.g. to bfloat16) must not round the counts or the
        # bias: they stay float32 and only follow the device.
        super()._apply(fn, recurse)
        self.expert_bias = self.expert_bias.float()
        self.tokens_per_expert = self.tokens_per_expert.float()
        return self

    def forward(self, x_BSD: torch.Tensor, *, ignore_capacity: bool = False,
                return_probs: bool = False, decoding: bool = False) -> RouterOutput:
        """Args:
            x_BSD: the layer input.
            ignore_capacity: route every token to its top-k experts even when
                `capacity_factor` is set. Inference uses it: with a capacity
                limit a token's experts depend on the other tokens of the
                batch, so the same prompt would decode differently alone and
                in a batch, or with padding.
            return_probs: also return the per-token probabilities (`probs_TE`).
            decoding: a cached decoding step (`MoETransformer`'s KV-cache path): no balancing losses and no
                load statistics, which nothing reads there (they were ~15% of a batch-1 decode step).
        """
        cfg = self.config
        batch, seq_len, _ = x_BSD.shape
        x_TD = x_BSD.reshape(batch * seq_len, -1)
        if self.training and cfg.jitter_eps > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
            x_TD = x_TD * noise
        # The gate GEMM and the scores in at least float32, whatever the activation dtype and autocast (as
        # Megatron and torchtitan route): bf16 logits would flip near-tied expert choices.
        gate_dtype = torch.promote_types(x_TD.dtype, torch.float32)
        if torch.is_autocast_enabled(x_TD.device.type):
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                logits_TE = F.linear(x_TD.to(gate_dtype), self.gate.weight.to(gate_dtype))
        else:  # no context to enter and leave (a decoding step calls this once per layer)
            logits_TE = F.linear(x_TD.to(gate_dtype), self.gate.weight.to(gate_dtype))
        score_dtype = torch.promote_types(logits_TE.dtype, torch.float32)
        scores_TE = self.score_function.scores(logits_TE, score_dtype)

        if cfg.bias_update_rate > 0:
            _, topk_ids_TK = torch.topk(scores_TE.detach() + self.expert_bias, cfg.top_k, dim=-1)
            topk_scores_TK = scores_TE.gather(1, topk_ids_TK)
        else:
            topk_scores_TK, topk_ids_TK = torch.topk(scores_TE, cfg.top_k, dim=-1)
        if cfg.renormalize or self.score_function.renormalize_topk:
            topk_scores_TK = topk_scores_TK / topk_scores_TK.sum(dim=-1, keepdim=True)
        topk_weights_TK = topk_scores_TK * cfg.route_scale

        num_tokens = batch * seq_len
        dropped_fraction = torch.zeros((), device=x_BSD.device)
        if cfg.capacity_factor is not None and not ignore_capacity:
            capacity = math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / self.num_experts)
            keep_TK = capacity_keep_mask(topk_ids_TK, topk_weights_TK, self.num_experts, capacity, cfg.drop_policy)
            dropped_fraction = 1.0 - keep_TK.float().mean()
            topk_weights_TK = topk_weights_TK * keep_TK
            routed_ids_TK = torch.where(keep_TK, topk_ids_TK, torch.full_like(topk_ids_TK, -1))
        else:
            routed_ids_TK = topk_ids_TK

        aux_loss = torch.zeros((), device=x_BSD.device, dtype=score_dtype)
        losses: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        if not decoding:
            aux_loss, losses = self._balancing_losses(logits_TE, scores_TE, topk_ids_TK, batch, seq_len, aux_loss)
            stats = load_stats(routed_ids_TK, scores_TE, dropped_fraction, self.num_experts)
            if self.training and cfg.bias_update_rate > 0 and not self.recomputing:
                with torch.no_grad():
                    self.tokens_per_expert += stats["tokens_per_expert"].to(self.tokens_per_expert.device)
        probs_TE = self.score_function.distribution(scores_TE.detach()) if return_probs else None
        return RouterOutput(routed_ids_TK, topk_weights_TK.to(x_BSD.dtype), aux_loss, losses, stats, probs_TE)

    def _balancing_losses(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor,
                          batch: int, seq_len: int, aux_loss: torch.Tensor
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the configured balancing losses and each one alone (detached). They see the
        router's choice before any capacity dropping."""
        cfg = self.config
        losses: dict[str, torch.Tensor] = {}
        if cfg.aux_loss_coef > 0:
            loss = switch_load_balancing_loss(self.score_function.distribution(scores_TE), topk_ids_TK)
            aux_loss = aux_loss + cfg.aux_loss_coef * loss
            losses["load_balancing"] = loss.detach()
        if cfg.seq_aux_loss_coef > 0:
            loss = sequence_balance_loss(scores_TE.view(batch, seq_len, -1), topk_ids_TK.view(batch, seq_len, -1))
            aux_loss = aux_loss + cfg.seq_aux_loss_coef * loss
            losses["sequence_balance"] = loss.detach()
        if cfg.z_loss_coef > 0:
            loss = router_z_loss(logits_TE)
            aux_loss = aux_loss + cfg.z_loss_coef * loss
            losses["z_loss"] = loss.detach()
        return aux_loss, losses


def aux_free_routers(model: nn.Module) -> list[Router]:
    """The routers of `model` that use auxiliary-loss-free balancing."""
    return [m for m in model.modules() if isinstance(m, Router) and m.config.bias_update_rate > 0]


@torch.no_grad()
def update_expert_bias(model: nn.Module,
                       all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> Optional[torch.Tensor]:
    """DeepSeek-V3 auxiliary-loss-free bias update; call after each optimizer step.

    Stacks every aux-free router's `tokens_per_expert` into one (L, E) tensor,
    lets `all_reduce` sum it in place across data-parallel ranks (one
    collective for the whole model), then moves each bias by
    `gamma * sign(mean_load - load_e)` and resets the counts.

    Args:
        model: any module containing routers.
        all_reduce: in-place sum across ranks, e.g.
            `lambda t: torch.distributed.all_reduce(t, group=dp_group)`; None on
            a single process.
    Returns:
        The reduced (L, E) counts, or None when no router uses the bias.
    """
    routers = aux_free_routers(model)
    if not routers:
        return None
    counts_LE = torch.stack([r.tokens_per_expert for r in routers])
    if all_reduce is not None:
        all_reduce(counts_LE)
    for router, counts_E in zip(routers, counts_LE):
        mean_load = counts_E.mean()
        router.expert_bias += router.config.bias_update_rate * torch.sign(mean_load - counts_E)
        router.tokens_per_expert.zero_()
    return counts_LE


@torch.no_grad()
def discard_expert_counts(model: nn.Module) -> None:
    """Forgets the counts of a step that was not applied (e.g. skipped for a NaN loss)."""
    for router in model.modules():
        if isinstance(router, Router):
            router.tokens_per_expert.zero_()
