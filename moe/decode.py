"""One decoding step of `MoETransformer` compiled as a single graph (`Generator(compile_decode=True)`).

Shape legend: B rows (sequences), C cache slots per row, D hidden, H query heads, G key/value heads, Hd head
dimension, T tokens (= B: one per row), K top-k, E experts, V vocabulary.

NOTE: why one graph, and what makes it one.
A decoding step of a small model is some 400 operators on one token per row; on a CPU their dispatch and the
modules' Python cost more than their arithmetic (issue 18: a batch-1 step of `mixtral_tiny` is ~1.5 ms of
matmuls in ~4.7 ms). Compiled as one graph, the elementwise chains (norms, rotary, softmax, gates, residuals)
fuse into a few kernels and the Python runs once, at trace time. Three choices make the step one graph:
1. No host-side branching on lengths: the step reads slots 0..K-1 of the cache (K, the longest row's
   length, is a dynamic size) with a mask per row (slot j of row b is seen iff j <= p_b and
   p_b - j < sliding_window, `cached_attention_mask`), where the eager step also skips slots out of every
   row's window and drops the mask when all rows are at one position.
2. The new keys and values are written into the cache tensors in place, each row at its own position (an
   indexed write into the graph's inputs: no copy of the cache).
3. The routed experts, whose row counts depend on the data, are one opaque operator (`moe::decode_experts`,
   the eager `GroupedExperts` computation); the dispatch before it (sort by expert, count) and the combine
   after it (gate, sum) are `LocalDispatcher`'s, traced into the graph.
The batch and the cache capacity are marked dynamic, so a batch that shrinks as requests finish and a cache
that grows (`KVCache.reserve`) reuse the graph; a batch of one row gets a graph of its own (torch specialises
sizes of 1). Each distinct graph costs one compilation (seconds to tens of seconds) on first use.

The logits equal the eager `MoETransformer(..., cache=...)` step's up to float rounding (fused kernels sum in
another order): tests/test_decode.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from moe.dispatch import LocalDispatcher
from moe.experts import EXPERT_BACKENDS, autocast_experts_inputs
from moe.model import KVCache, MoETransformer, apply_rotary, cached_attention_mask


@torch.library.custom_op("moe::decode_experts", mutates_args=())
def decode_experts(x_ND: torch.Tensor, tokens_per_expert: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor,
                   w3_EDF: torch.Tensor, backend: str) -> torch.Tensor:
    """The experts on rows sorted by expert (`GroupedExperts.forward`), opaque to the compiler: how many rows
    each expert gets depends on the routing."""
    x_ND, (w1_EDF, w2_EFD, w3_EDF) = autocast_experts_inputs(x_ND, (w1_EDF, w2_EFD, w3_EDF))
    return EXPERT_BACKENDS[backend](x_ND, tokens_per_expert, w1_EDF, w2_EFD, w3_EDF)


@decode_experts.register_fake
def _decode_experts_fake(x_ND, tokens_per_expert, w1_EDF, w2_EFD, w3_EDF, backend):
    x_ND, (_, w2_EFD, _) = autocast_experts_inputs(x_ND, (w1_EDF, w2_EFD, w3_EDF))
    return x_ND.new_empty(x_ND.shape[0], w2_EFD.shape[-1])


class DecodeOutput(NamedTuple):
    """One decoding step's next-token distribution: logits_BV, their log-softmax in at least float32
    (logprobs_BV), and the greedy choice (greedy_B, the first of tied maxima, as `Tensor.argmax`)."""

    logits_BV: torch.Tensor
    logprobs_BV: torch.Tensor
    greedy_B: torch.Tensor


def decode_step(model: MoETransformer, input_ids_B1: torch.Tensor, positions_B: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor], rope_table: tuple[torch.Tensor, torch.Tensor],
                read_slots_K: torch.Tensor) -> DecodeOutput:
    """One new token per row at position `positions_B[b]` (= the row's cached length); writes its keys and
    values into `keys[i]` / `values[i]` (B, G, C, Hd) in place and returns the `DecodeOutput`: the log-softmax
    and the argmax over the vocabulary are fused into the graph too.

    `rope_table` is `model.rope(max_seq_len)`'s cos and sin, computed eagerly once: gathered rows are the eager
    step's values bit for bit (a compiled cos rounds differently in float32). The queries read slots
    0..K-1 of the cache, K = len(read_slots_K) = the longest row's length after this step (a dynamic size)."""
    config = model.config
    batch = input_ids_B1.shape[0]
    num_heads, num_kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    rows_B = torch.arange(batch, device=input_ids_B1.device)
    x_B1D = model.embed_tokens(input_ids_B1)
    cos, sin = (table[positions_B].view(batch, 1, 1, head_dim) for table in rope_table)
    num_read = read_slots_K.shape[0]
    mask_B11K = cached_attention_mask(positions_B.unsqueeze(1), 0, num_read, config.sliding_window)
    for index, layer in enumerate(model.layers):
        attn = layer.attn
        h_B1D = layer.attn_norm(x_B1D)
        q = attn.q_proj(h_B1D).view(batch, 1, num_heads, head_dim).transpose(1, 2)
        k = attn.k_proj(h_B1D).view(batch, 1, num_kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(h_B1D).view(batch, 1, num_kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Advanced indices on dims 0 and 2: row b's new key goes to slot positions_B[b].
        keys[index][rows_B, :, positions_B] = k[:, :, 0]
        values[index][rows_B, :, positions_B] = v[:, :, 0]
        out = F.scaled_dot_product_attention(q, keys[index][:, :, :num_read], values[index][:, :, :num_read],
                                             attn_mask=mask_B11K, enable_gqa=num_kv_heads != num_heads)
        x_B1D = x_B1D + attn.o_proj(out.transpose(1, 2).reshape(batch, 1, num_heads * head_dim))
        h_B1D = layer.ffn_norm(x_B1D)
        if not layer.is_moe:
            x_B1D = x_B1D + layer.ffn(h_B1D)
            continue
        ffn = layer.ffn
        routing = ffn.router(h_B1D, ignore_capacity=True, decoding=True)
        h_TD = h_B1D.view(batch, -1)
        # Dropless whatever the capacity factor: decoding routes every token to its top-k (no id is -1).
        dispatcher = LocalDispatcher(ffn.num_experts, dropless=True)
        x_ND, tokens_per_expert, state = dispatcher.dispatch(h_TD, routing.topk_ids_TK)
        experts = ffn.experts
        y_ND = decode_experts(x_ND, tokens_per_expert, experts.w1_EDF, experts.w2_EFD, experts.w3_EDF,
                              experts.backend)
        out_TD = dispatcher.combine(y_ND, routing.topk_weights_TK, state)
        if ffn.shared_experts is not None:
            out_TD = out_TD + ffn.shared_experts(h_TD)
        x_B1D = x_B1D + out_TD.view(batch, 1, -1)
    logits_BV = model.lm_head(model.norm(x_B1D))[:, 0]
    logprobs_BV = torch.log_softmax(logits_BV.to(torch.promote_types(logits_BV.dtype, torch.float32)), dim=-1)
    return DecodeOutput(logits_BV, logprobs_BV, logits_BV.argmax(dim=-1))


class CompiledDecoder:
    """`decode_step` compiled once per model, called on a `KVCache` like the eager step.

        decoder = CompiledDecoder(model)
        out = decoder(last_ids_B1, cache)   # out.logits_BV = model(last_ids_B1, cache=cache).logits[:, -1]

    Args:
        model: an eval-mode model (its weights are read at each call, not copied).
        options: passed to `torch.compile` (default `fullgraph=True`: a graph break would be a bug).
    """

    def __init__(self, model: MoETransformer, **options) -> None:
        for layer in model.layers:
            if layer.is_moe and not isinstance(layer.ffn.dispatcher, LocalDispatcher):
                raise ValueError(f"CompiledDecoder decodes a single-process model (every expert local); layer "
                                 f"{layer.attn.layer_id} dispatches with {type(layer.ffn.dispatcher).__name__}")
        self.model = model
        options.setdefault("fullgraph", True)
        self._step = torch.compile(decode_step, **options)
        self._rope_tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _rope_table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if (device, dtype) not in self._rope_tables:
            self._rope_tables[device, dtype] = self.model.rope(self.model.config.max_seq_len, device, dtype)
        return self._rope_tables[device, dtype]

    def __call__(self, input_ids_B1: torch.Tensor, cache: KVCache) -> DecodeOutput:
        batch = input_ids_B1.shape[0]
        if input_ids_B1.dim() != 2 or input_ids_B1.shape[1] != 1:
            raise ValueError(f"CompiledDecoder decodes one token per row: input_ids must be (B, 1), got "
                             f"{tuple(input_ids_B1.shape)}")
        cache.check_room(batch, 1, self.model.config.max_seq_len)
        if any(t is None for t in cache.keys):
            raise ValueError("CompiledDecoder needs a cache written by a forward pass (the prompt's prefill)")
        # One slot more than this step writes: the slots read (K) then stay fewer than the capacity (C). A first
        # trace that saw K == C would guard on that equality and compile again at the first K < C.
        cache.reserve(2)
        device = input_ids_B1.device
        positions_B = torch.tensor(cache.lengths, device=device)
        read_slots_K = torch.arange(max(cache.lengths) + 1, device=device)
        if batch > 1:
            for t in (input_ids_B1, positions_B, *cache.keys, *cache.values):
                torch._dynamo.mark_dynamic(t, 0)
        for t in (*cache.keys, *cache.values):
            torch._dynamo.mark_dynamic(t, 2)
        torch._dynamo.mark_dynamic(read_slots_K, 0)
        rope_table = self._rope_table(cache.keys[0].device, self.model.embed_tokens.weight.dtype)
        out = self._step(self.model, input_ids_B1, positions_B, cache.keys, cache.values, rope_table, read_slots_K)
        cache.advance(1)
        return out

