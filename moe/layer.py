"""The feed-forward blocks: a dense SwiGLU and the MoE layer.

Shape legend: B batch, S sequence, T tokens (B*S), D hidden, N routed rows.

`MoELayer` composes router -> dispatcher -> grouped experts -> combine, plus
optional shared experts (computed while the dispatcher's combine exchange is
in flight). The dispatcher is a plain attribute: expert parallelism replaces
it (and the experts, by their local shard) from outside.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import ModelConfig
from moe.dispatch import LocalDispatcher
from moe.experts import GroupedExperts
from moe.router import Router, RouterOutput


class FeedForward(nn.Module):
    """Dense SwiGLU: `w2(silu(w1 x) * w3 x)` (Mixtral/Llama naming)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoELayer(nn.Module):
    """Top-k routed SwiGLU experts, dropless unless a capacity factor is set."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        experts_cfg = config.experts
        self.num_experts = experts_cfg.num_experts
        self.router = Router(config.hidden_size, experts_cfg.num_experts, config.router)
        self.experts = GroupedExperts(experts_cfg.num_experts, config.hidden_size, experts_cfg.hidden_size,
                                      experts_cfg.backend)
        self.dispatcher = LocalDispatcher(experts_cfg.num_experts, dropless=config.router.capacity_factor is None)
        self.shared_experts = None
        if experts_cfg.num_shared_experts:
            shared_width = experts_cfg.num_shared_experts * (experts_cfg.shared_hidden_size or experts_cfg.hidden_size)
            self.shared_experts = FeedForward(config.hidden_size, shared_width)

    def forward(self, x_BSD: torch.Tensor, *, ignore_capacity: bool = False,
                return_router_probs: bool = False, decoding: bool = False) -> tuple[torch.Tensor, RouterOutput]:
        """Args:
            x_BSD: the layer input.
            ignore_capacity, return_router_probs, decoding: see `Router.forward`
                (inference options; training uses the defaults).
        """
        batch, seq_len, hidden = x_BSD.shape
        routing = self.router(x_BSD, ignore_capacity=ignore_capacity, return_probs=return_router_probs,
                              decoding=decoding)
        x_TD = x_BSD.reshape(batch * seq_len, hidden)
        x_ND, tokens_per_expert, state = self.dispatcher.dispatch(x_TD, routing.topk_ids_TK)
        y_ND = self.experts(x_ND, tokens_per_expert)
        shared = None if self.shared_experts is None else (lambda: self.shared_experts(x_TD))
        out_TD = self.dispatcher.combine(y_ND, routing.topk_weights_TK, state, overlap=shared)
        return out_TD.view(batch, seq_len, hidden), routing
