"""Mixtral-family decoder-only transformer (single-device model code).

Shape legend: B batch, S sequence, D hidden, H query heads, G key/value heads,
Hd head dim, V vocabulary.

Parallelism is applied from outside (see `cluster/`); nothing here knows about
process groups or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import ModelConfig
from moe.experts import GroupedExperts, init_out_std
from moe.layer import FeedForward, MoELayer
from moe.router import Router


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the half-split layout used by Mixtral/Llama."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs_SH = torch.outer(positions, self.inv_freq.to(device))
        emb_SHd = torch.cat((freqs_SH, freqs_SH), dim=-1)
        return emb_SHd.cos().to(dtype), emb_SHd.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_BHSHd: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
    return x_BHSHd * cos_SHd + _rotate_half(x_BHSHd) * sin_SHd


def attention_mask(seq_len: int, device: torch.device, sliding_window: Optional[int],
                   doc_ids_BS: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Boolean mask (True = attend) of shape (B or 1, 1, S, S), or None for plain causal."""
    if sliding_window is None and doc_ids_BS is None:
        return None
    q_pos = torch.arange(seq_len, device=device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=device).unsqueeze(0)
    mask_SS = k_pos <= q_pos
    if sliding_window is not None:
        mask_SS = mask_SS & (q_pos - k_pos < sliding_window)
    mask = mask_SS[None, None]
    if doc_ids_BS is not None:
        same_doc_BSS = doc_ids_BS.unsqueeze(2) == doc_ids_BS.unsqueeze(1)
        mask = mask & same_doc_BSS.unsqueeze(1)
    return mask


class Attention(nn.Module):
    """Grouped-query attention through `scaled_dot_product_attention`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x_BSD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        batch, seq_len, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.num_kv_heads != self.num_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_id)
        self.ffn = MoELayer(config) if self.is_moe else FeedForward(config.hidden_size, config.dense_hidden_size)

    def forward(self, x_BSD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: Optional[torch.Tensor]):
        h = x_BSD + self.attn(self.attn_norm(x_BSD), rope, mask)
        if self.is_moe:
            ffn_out, routing = self.ffn(self.ffn_norm(h))
            return h + ffn_out, routing
        return h + self.ffn(self.ffn_norm(h)), None


@dataclass
class MoEOutput:
    """Result of `MoETransformer.forward`.

    Attributes:
        logits: (B, S, V).
        aux_loss: weighted balancing losses, averaged over MoE layers (scalar;
            0 for a dense model). Add it to the language-model loss.
        router_stats: one dict per MoE layer, see `moe.router.load_stats`.
        loss: mean next-token cross entropy when targets were given.
        losses: each unweighted balancing loss averaged over MoE layers.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    router_stats: list[dict[str, torch.Tensor]] = field(default_factory=list)
    loss: Optional[torch.Tensor] = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


class MoETransformer(nn.Module):
    """Decoder-only Mixtral-style transformer with MoE feed-forward blocks."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        out_std = init_out_std(std, self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith(("o_proj", "w2"))
                nn.init.normal_(module.weight, std=out_std if is_output else std)
            elif isinstance(module, GroupedExperts):
                module.reset_parameters(std, out_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Router):
                module.expert_bias.zero_()
                module.tokens_per_expert.zero_()

    def forward(self, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> MoEOutput:
        """Args:
            input_ids: (B, S) token ids.
            doc_ids: optional (B, S) document ids of packed sequences; tokens
                attend only within their document.
            targets: optional (B, S) next-token ids (-100 is ignored).
        """
        self._check_inputs(input_ids, doc_ids, targets)
        batch, seq_len = input_ids.shape
        x_BSD = self.embed_tokens(input_ids)
        rope = self.rope(seq_len, x_BSD.device, x_BSD.dtype)
        mask = attention_mask(seq_len, x_BSD.device, self.config.sliding_window, doc_ids)
        aux_losses, router_stats = [], []
        losses: dict[str, list[torch.Tensor]] = {}
        for layer in self.layers:
            x_BSD, routing = layer(x_BSD, rope, mask)
            if routing is not None:
                aux_losses.append(routing.aux_loss)
                router_stats.append(routing.stats)
                for name, value in routing.losses.items():
                    losses.setdefault(name, []).append(value)
        logits = self.lm_head(self.norm(x_BSD))
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else logits.new_zeros((), dtype=torch.float32)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return MoEOutput(logits, aux_loss, router_stats, loss,
                         {name: torch.stack(values).mean() for name, values in losses.items()})

    def _check_inputs(self, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor],
                      targets: Optional[torch.Tensor]) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be a 2-D integer tensor (batch, seq), got shape "
                             f"{tuple(input_ids.shape)} and dtype {input_ids.dtype}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds ModelConfig.max_seq_len "
                             f"({self.config.max_seq_len})")
        for name, other in (("doc_ids", doc_ids), ("targets", targets)):
            if other is not None and other.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(other.shape)}")

    def num_parameters(self) -> dict[str, int]:
        """Total parameters and parameters active per token (non-embedding included)."""
        return count_parameters(self.config)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameter counts from the config alone: `total`, `active` (per token) and
    `active_non_embedding` (for FLOPs: 6 * active_non_embedding per token,
    plus attention)."""
    d, v = config.hidden_size, config.vocab_size
    attn = d * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    norms = 2 * d
    experts = config.experts
    shared = 3 * d * experts.num_shared_experts * (experts.shared_hidden_size or experts.hidden_size)
    moe_total = 3 * d * experts.hidden_size * experts.num_experts + d * experts.num_experts + shared
    moe_active = 3 * d * experts.hidden_size * config.router.top_k + d * experts.num_experts + shared
    dense = 3 * d * config.dense_hidden_size
    num_dense, num_moe = config.first_k_dense, config.num_moe_layers
    body_total = config.num_layers * (attn + norms) + num_dense * dense + num_moe * moe_total + d
    body_active = config.num_layers * (attn + norms) + num_dense * dense + num_moe * moe_active + d
    embeddings = v * d if config.tie_embeddings else 2 * v * d
    return {
        "total": body_total + embeddings,
        "active": body_active + embeddings,
        "active_non_embedding": body_active + v * d,  # the output head does compute
    }
