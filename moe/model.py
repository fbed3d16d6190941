"""Mixtral-family decoder-only transformer (single-device model code).

Shape legend: B batch, S sequence (new tokens), D hidden, H query heads,
G key/value heads, Hd head dim, V vocabulary, E experts, C cache capacity
(slots per sequence), K keys attended in one cached step.

Parallelism is applied from outside (see `cluster/`); nothing here knows about
process groups or Ray. `KVCache` holds the keys and values of incremental
decoding (`moe.generate`); without a cache the forward pass is the training one.

Activation checkpointing (`MoETransformer.set_activation_checkpointing`) keeps
only each chosen block's input during the forward pass and recomputes the block
in the backward pass (torch's non-reentrant checkpoint, RNG state restored, so
router jitter draws the same noise); the routers do not count the recomputed
tokens a second time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from moe.config import ACTIVATION_CHECKPOINTING, ModelConfig  # noqa: F401 (re-exported)
from moe.experts import GroupedExperts, init_out_std
from moe.layer import FeedForward, MoELayer
from moe.router import Router


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In at least float32 (bf16 activations are normalised in float32), never below the input's dtype: a
        # float64 model rounded here to float32 would not be a float64 reference, and a compiled graph (which
        # drops such round trips) would not reproduce it.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
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

    def at_positions(self, positions_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, 1, S, Hd) at each sequence's own positions (cached decoding).

        The same float32 angles as `forward` (an outer product is an
        elementwise product), so position p gets bit-identical values.
        """
        freqs_BSH = positions_BS.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(positions_BS.device)
        emb_BSHd = torch.cat((freqs_BSH, freqs_BSH), dim=-1).unsqueeze(1)
        return emb_BSHd.cos().to(dtype), emb_BSHd.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_BHSHd: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
    """Rotates in the wider of the two dtypes and returns x's: under bf16 autocast q and k stay bf16 like v
    (float32 tables would promote them, and flex attention refuses mixed q/k/v dtypes)."""
    return (x_BHSHd * cos_SHd + _rotate_half(x_BHSHd) * sin_SHd).to(x_BHSHd.dtype)


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


_COMPILED_FLEX: dict[str, Any] = {}  # compiled on first use: flex_attention is only fast compiled


def _compiled(name: str):
    if name not in _COMPILED_FLEX:
        fn = {"flex_attention": flex_attention, "create_block_mask": create_block_mask}[name]
        _COMPILED_FLEX[name] = torch.compile(fn, dynamic=False)
    return _COMPILED_FLEX[name]


def flex_block_mask(seq_len: int, device: torch.device, sliding_window: Optional[int],
                    doc_ids_BS: Optional[torch.Tensor], *, compiled: bool = True) -> Optional[BlockMask]:
    """The mask of `attention_mask` as a FlexAttention block mask (None for plain causal).

    Built once per batch and shared by every layer; only per-block tables are
    stored, never an S x S tensor. `compiled=False` builds it eagerly (the
    same mask; evaluates mask_mod on the whole S x S grid once, no compile).
    """
    if sliding_window is None and doc_ids_BS is None:
        return None

    def mask_mod(b, h, q, k):
        keep = k <= q
        if sliding_window is not None:
            keep = keep & (q - k < sliding_window)
        if doc_ids_BS is not None:
            keep = keep & (doc_ids_BS[b, q] == doc_ids_BS[b, k])
        return keep

    batch = None if doc_ids_BS is None else doc_ids_BS.shape[0]
    build = _compiled("create_block_mask") if compiled else create_block_mask
    return build(mask_mod, batch, None, seq_len, seq_len, device=device)


def cached_attention_mask(positions_BS: torch.Tensor, key_start: int, key_end: int,
                          sliding_window: Optional[int]) -> torch.Tensor:
    """Boolean mask (B, 1, S, K) of a cached step: query at position p sees cache slot j
    (= position j) of its own row iff j <= p and p - j < sliding_window, as `attention_mask`.

    Slots past a row's own tokens (another row is longer, or right padding)
    lie after every real query of that row, so causality masks them.
    """
    k_pos = torch.arange(key_start, key_end, device=positions_BS.device)
    q_pos = positions_BS.unsqueeze(-1)
    mask_BSK = k_pos <= q_pos
    if sliding_window is not None:
        mask_BSK = mask_BSK & (q_pos - k_pos < sliding_window)
    return mask_BSK.unsqueeze(1)


class KVCache:
    """Keys and values of every layer for incremental decoding, one row per sequence.

    Slot j of row b holds position j of sequence b and `lengths[b]` slots are
    filled, so sequences of different lengths decode in one batch at their own
    positions (rotary angles and masks follow each row's positions). Tensors
    are (B, G, C, Hd) per layer, allocated zero-filled at the first write in
    the dtype of the keys (stale or never-written slots are masked, and zeros
    keep a masked score finite: -inf plus NaN would poison the softmax). The
    whole sequence is kept; a sliding window is applied by the mask (and by
    not reading slots no query can see), not by a rolling buffer.

    Args:
        num_layers: layers of the model.
        batch_size: rows.
        capacity: initial slots per row; `reserve` grows it.
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"KVCache.batch_size must be positive, got {batch_size}")
        self.num_layers = num_layers
        self.capacity = capacity
        self.lengths: list[int] = [0] * batch_size  # on the host: no device sync to plan a step
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def check_room(self, batch: int, num_new: int, max_seq_len: int) -> None:
        """ValueError unless `batch` rows of `num_new` new tokens each fit: one row per cache row, and every
        row within `max_seq_len` (`ModelConfig.max_seq_len`) after them."""
        if self.batch_size != batch:
            raise ValueError(f"cache has {self.batch_size} rows but input_ids has {batch}")
        if max(self.lengths) + num_new > max_seq_len:
            raise ValueError(f"cached length {max(self.lengths)} + {num_new} new tokens exceeds "
                             f"ModelConfig.max_seq_len ({max_seq_len})")

    def reserve(self, num_new: int) -> None:
        """Makes room for `num_new` more tokens in every row (capacity at least doubles when it grows)."""
        needed = max(self.lengths) + num_new
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for layer, t in enumerate(store):
                if t is not None:
                    store[layer] = F.pad(t, (0, 0, 0, new_capacity - self.capacity))
        self.capacity = new_capacity

    def update(self, layer: int, k_BGSHd: torch.Tensor, v_BGSHd: torch.Tensor, positions_BS: torch.Tensor,
               key_start: int, key_end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new keys/values at their positions (row b's: lengths[b] + 0..S-1, as `_forward_cached`
        makes them); returns slots [key_start, key_end) (B, G, K, Hd)."""
        if self.keys[layer] is None:
            batch, num_kv_heads, _, head_dim = k_BGSHd.shape
            shape = (batch, num_kv_heads, self.capacity, head_dim)
            self.keys[layer] = k_BGSHd.new_zeros(shape)
            self.values[layer] = v_BGSHd.new_zeros(shape)
        if len(set(self.lengths)) == 1:  # every row at the same position: one slice (read on the host)
            start = self.lengths[0]
            self.keys[layer][:, :, start:start + k_BGSHd.shape[2]] = k_BGSHd
            self.values[layer][:, :, start:start + v_BGSHd.shape[2]] = v_BGSHd
        else:
            rows_B1 = torch.arange(self.batch_size, device=positions_BS.device).unsqueeze(1)
            # Advanced indices on dims 0 and 2 put their (B, S) shape first: (B, S, G, Hd).
            self.keys[layer][rows_B1, :, positions_BS] = k_BGSHd.transpose(1, 2)
            self.values[layer][rows_B1, :, positions_BS] = v_BGSHd.transpose(1, 2)
        return self.keys[layer][:, :, key_start:key_end], self.values[layer][:, :, key_start:key_end]

    def advance(self, num_new: "int | list[int]") -> None:
        """Counts the tokens just written: the same number for every row, or one per row."""
        counts = [num_new] * self.batch_size if isinstance(num_new, int) else list(num_new)
        self.lengths = [length + n for length, n in zip(self.lengths, counts, strict=True)]

    def select(self, rows: list[int]) -> "KVCache":
        """A cache of only `rows` (in that order): finished sequences leave the batch."""
        if not rows:
            raise ValueError("KVCache.select: at least one row must remain")
        out = KVCache(self.num_layers, len(rows), self.capacity)
        out.lengths = [self.lengths[r] for r in rows]
        for name in ("keys", "values"):
            for layer, t in enumerate(getattr(self, name)):
                if t is not None:
                    getattr(out, name)[layer] = t[torch.tensor(rows, device=t.device)]
        return out

    @classmethod
    def concat(cls, caches: list["KVCache"]) -> "KVCache":
        """One cache holding the rows of `caches` in order (new sequences join a running batch)."""
        capacity = max(c.capacity for c in caches)
        out = cls(caches[0].num_layers, sum(c.batch_size for c in caches), capacity)
        out.lengths = [length for c in caches for length in c.lengths]
        for layer in range(out.num_layers):
            for name in ("keys", "values"):
                parts = [getattr(c, name)[layer] for c in caches]
                if any(t is None for t in parts):
                    raise ValueError("KVCache.concat: every cache must have been written by a forward pass")
                getattr(out, name)[layer] = torch.cat(
                    [F.pad(t, (0, 0, 0, capacity - t.shape[2])) for t in parts])
        return out


@dataclass
class CacheStep:
    """One cached forward pass as every attention layer sees it: where the new
    tokens go and which slots [key_start, key_end) the queries may read."""

    cache: KVCache
    positions_BS: torch.Tensor
    key_start: int
    key_end: int


class Attention(nn.Module):
    """Grouped-query attention through `scaled_dot_product_attention`."""

    def __init__(self, config: ModelConfig, layer_id: int = 0) -> None:
        super().__init__()
        self.layer_id = layer_id  # its slot in a KVCache
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x_BSD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: Optional[torch.Tensor | BlockMask], cache_step: Optional[CacheStep] = None) -> torch.Tensor:
        batch, seq_len, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.num_kv_heads != self.num_heads
        if cache_step is not None:
            k, v = cache_step.cache.update(self.layer_id, k, v, cache_step.positions_BS, cache_step.key_start,
                                           cache_step.key_end)
        if mask is None:  # causal, or a cached step whose queries see every slot read (`_forward_cached`)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=cache_step is None, enable_gqa=gqa)
        elif isinstance(mask, BlockMask):
            out = _compiled("flex_attention")(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            if gqa:
                # With an explicit mask, `enable_gqa` leaves SDPA only its MATH backend on CUDA, which keeps
                # float32 B x H x S x S probabilities (about 2 GiB per mixtral_small layer; issue 18, C4).
                # Expanded K/V (B x H x S x head_dim, far smaller) let the memory-efficient kernel take the mask.
                repeats = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_id)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_id)
        self.ffn = MoELayer(config) if self.is_moe else FeedForward(config.hidden_size, config.dense_hidden_size)
        self.checkpoint_activations = False  # set by MoETransformer.set_activation_checkpointing

    def forward(self, x_BSD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: Optional[torch.Tensor | BlockMask], cache_step: Optional[CacheStep] = None, *,
                ignore_capacity: bool = False, return_router_probs: bool = False):
        h = x_BSD + self.attn(self.attn_norm(x_BSD), rope, mask, cache_step)
        if self.is_moe:
            ffn_out, routing = self.ffn(self.ffn_norm(h), ignore_capacity=ignore_capacity,
                                        return_router_probs=return_router_probs, decoding=cache_step is not None)
            return h + ffn_out, routing
        return h + self.ffn(self.ffn_norm(h)), None


@dataclass
class MoEOutput:
    """Result of `MoETransformer.forward`.

    Attributes:
        logits: (B, S, V); None when the loss was computed in chunks
            (`loss_chunk_tokens`), which never holds them whole.
        aux_loss: weighted balancing losses, summed over MoE layers (scalar;
            0 for a dense model): each layer adds its own, as in Switch,
            ST-MoE and Megatron-LM, so a coefficient means the same at any
            depth. Add it to the language-model loss.
        router_stats: one dict per MoE layer, see `moe.router.load_stats`.
        loss: mean next-token cross entropy when targets were given.
        losses: each unweighted balancing loss averaged over MoE layers.
        router_probs: with `return_router_probs`, one detached (B, S, E)
            tensor per MoE layer: each token's probabilities over experts.
        hidden_states: with `return_hidden_states`, the residual stream after
            each block, one (B, S, D) tensor per layer (before the final norm).
    """

    logits: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    router_stats: list[dict[str, torch.Tensor]] = field(default_factory=list)
    loss: Optional[torch.Tensor] = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    router_probs: list[torch.Tensor] = field(default_factory=list)
    hidden_states: list[torch.Tensor] = field(default_factory=list)




@contextlib.contextmanager
def _recomputing(block: TransformerBlock):
    """Marks the block's router as recomputing (activation checkpointing's second forward pass)."""
    routers = [m for m in block.modules() if isinstance(m, Router)]
    for router in routers:
        router.recomputing = True
    try:
        yield
    finally:
        for router in routers:
            router.recomputing = False


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
        self._build_mask = flex_block_mask if config.attention_backend == "flex" else attention_mask
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

    def set_activation_checkpointing(self, mode: str) -> None:
        """Which blocks recompute their activations in the backward pass.

        Args:
            mode: "none"; "full" (every block keeps only its input); or
                "selective" (every other block, starting with the first: about
                half the activation memory saved for half the recomputation).
        """
        if mode not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {list(ACTIVATION_CHECKPOINTING)}, "
                             f"got {mode!r}")
        for index, layer in enumerate(self.layers):
            layer.checkpoint_activations = mode == "full" or (mode == "selective" and index % 2 == 0)

    def compile_blocks(self, **options) -> None:
        """Compiles each transformer block separately (regional compilation, as torchtitan does).

        All blocks share one compiled graph (same code, same shapes). With
        dropless routing the MoE layer has no data-dependent shapes (counts are
        scatter-adds, grouped_mm goes through `moe::grouped_mm` under compile),
        so a block compiles without graph breaks and training steps of one
        shape never recompile; a new batch shape (evaluation) recompiles once
        and then runs with dynamic sizes. A capacity limit adds one graph
        break (the host needs the number of kept rows). Options go to
        `torch.compile`.
        """
        for layer in self.layers:
            layer.compile(**options)

    def forward(self, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, *, cache: Optional[KVCache] = None,
                input_lengths: Optional[list[int]] = None, ignore_capacity: bool = False,
                return_router_probs: bool = False, return_hidden_states: bool = False,
                loss_chunk_tokens: Optional[int] = None) -> MoEOutput:
        """Args:
            input_ids: (B, S) token ids.
            doc_ids: optional (B, S) document ids of packed sequences; tokens
                attend only within their document.
            targets: optional (B, S) next-token ids (-100 is ignored).
            cache: incremental decoding: the new tokens of row b take positions
                cache.lengths[b] + (0..S-1), attend to the cached tokens and are
                added to the cache (see `_forward_cached`). Not with doc_ids
                or targets.
            input_lengths: with a cache, the real (non-padding) tokens of each
                row, right-padded to S; the cache advances by these. Default S.
            ignore_capacity: route every token to its top-k experts whatever
                the capacity factor, so a token's output does not depend on
                the rest of the batch (inference; always on with a cache).
            return_router_probs: fill `MoEOutput.router_probs`.
            return_hidden_states: fill `MoEOutput.hidden_states`.
            loss_chunk_tokens: with targets, compute the loss over this many
                tokens at a time (`chunked_cross_entropy`): the (B, S, V)
                logits and their gradients are never held whole, and
                `MoEOutput.logits` is None.
        """
        self._check_inputs(input_ids, doc_ids, targets)
        if loss_chunk_tokens is not None and (targets is None or loss_chunk_tokens < 1):
            raise ValueError(f"loss_chunk_tokens: needs targets and a positive count, got {loss_chunk_tokens!r}")
        if cache is not None:
            if doc_ids is not None or targets is not None:
                raise ValueError("doc_ids and targets are not supported with a cache (incremental decoding)")
            return self._forward_cached(input_ids, cache, input_lengths, return_router_probs, return_hidden_states)
        batch, seq_len = input_ids.shape
        x_BSD = self.embed_tokens(input_ids)
        rope = self.rope(seq_len, x_BSD.device, x_BSD.dtype)
        mask = self._build_mask(seq_len, x_BSD.device, self.config.sliding_window, doc_ids)
        aux_losses, router_stats, router_probs, hidden_states = [], [], [], []
        losses: dict[str, list[torch.Tensor]] = {}
        for layer in self.layers:
            if layer.checkpoint_activations and torch.is_grad_enabled():
                x_BSD, routing = torch.utils.checkpoint.checkpoint(
                    layer, x_BSD, rope, mask, ignore_capacity=ignore_capacity,
                    return_router_probs=return_router_probs, use_reentrant=False,
                    context_fn=lambda layer=layer: (contextlib.nullcontext(), _recomputing(layer)))
            else:
                x_BSD, routing = layer(x_BSD, rope, mask, ignore_capacity=ignore_capacity,
                                       return_router_probs=return_router_probs)
            if return_hidden_states:
                hidden_states.append(x_BSD.detach())
            if routing is not None:
                if return_router_probs:
                    router_probs.append(routing.probs_TE.view(batch, seq_len, -1))
                aux_losses.append(routing.aux_loss)
                router_stats.append(routing.stats)
                for name, value in routing.losses.items():
                    losses.setdefault(name, []).append(value)
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else x_BSD.new_zeros((), dtype=torch.float32)
        if loss_chunk_tokens is not None:
            h_TD = self.norm(x_BSD).reshape(-1, x_BSD.shape[-1])
            logits, loss = None, chunked_cross_entropy(h_TD, self.lm_head, targets.reshape(-1), loss_chunk_tokens)
        else:
            logits = self.lm_head(self.norm(x_BSD))
            loss = None
            if targets is not None:
                loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=-100)
        return MoEOutput(logits, aux_loss, router_stats, loss,
                         {name: torch.stack(values).mean() for name, values in losses.items()}, router_probs,
                         hidden_states)

    def _forward_cached(self, input_ids: torch.Tensor, cache: KVCache, input_lengths: Optional[list[int]],
                        return_router_probs: bool, return_hidden_states: bool = False) -> MoEOutput:
        """The forward pass of incremental decoding (prefill or one decode step).

        Routing ignores any capacity factor (each token keeps its top-k
        experts), so a sequence's tokens do not depend on its batch. Balancing
        losses are not computed (aux_loss is 0).
        """
        batch, seq_len = input_ids.shape
        cache.check_room(batch, seq_len, self.config.max_seq_len)
        if input_lengths is not None and (len(input_lengths) != batch
                                          or not all(1 <= n <= seq_len for n in input_lengths)):
            raise ValueError(f"input_lengths must give 1..{seq_len} real tokens for each of the {batch} rows, "
                             f"got {input_lengths}")
        device = input_ids.device
        cache.reserve(seq_len)
        start_B = torch.tensor(cache.lengths, device=device)
        positions_BS = start_B.unsqueeze(1) + torch.arange(seq_len, device=device)
        # Slots before key_start are out of every query's sliding window: not read at all.
        window = self.config.sliding_window
        key_start = 0 if window is None else max(0, min(cache.lengths) - window + 1)
        step = CacheStep(cache, positions_BS, key_start, max(cache.lengths) + seq_len)
        # One new token per row, every row at the same position: the query sees every slot read (those before
        # key_start are out of its window), so no mask, and SDPA keeps its fused kernel.
        uniform_step = seq_len == 1 and len(set(cache.lengths)) == 1
        mask = None if uniform_step else cached_attention_mask(positions_BS, step.key_start, step.key_end, window)
        x_BSD = self.embed_tokens(input_ids)
        rope = self.rope.at_positions(positions_BS, x_BSD.dtype)
        router_probs, hidden_states = [], []
        for layer in self.layers:
            x_BSD, routing = layer(x_BSD, rope, mask, step, ignore_capacity=True,
                                   return_router_probs=return_router_probs)
            if return_hidden_states:
                hidden_states.append(x_BSD)
            if routing is not None and return_router_probs:
                router_probs.append(routing.probs_TE.view(batch, seq_len, -1))
        cache.advance(seq_len if input_lengths is None else input_lengths)
        logits = self.lm_head(self.norm(x_BSD))
        return MoEOutput(logits, logits.new_zeros((), dtype=torch.float32), router_probs=router_probs,
                         hidden_states=hidden_states)

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


def chunked_cross_entropy(h_TD: torch.Tensor, head: nn.Module, targets_T: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross entropy of `head(h_TD)` (targets -100 ignored), `chunk_tokens` rows at a time.

    Each chunk's logits are computed, reduced to its summed loss and dropped
    (activation checkpointing per chunk: the backward recomputes them), so at
    most one chunk's logits and their gradients exist at once instead of
    T x V of each (issue 18, S6: about 6 GiB per rank for mixtral_small).
    The price is one more output-head matmul per chunk in the backward.
    Equal to `F.cross_entropy(head(h).float(), targets)` up to the order of
    the float32 sum (tests/test_model.py).
    """
    def chunk_loss(h_CD: torch.Tensor, targets_C: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h_CD).float(), targets_C, ignore_index=-100, reduction="sum")

    total = h_TD.new_zeros((), dtype=torch.float32)
    for start in range(0, h_TD.shape[0], chunk_tokens):
        h_CD, targets_C = h_TD[start:start + chunk_tokens], targets_T[start:start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(chunk_loss, h_CD, targets_C, use_reentrant=False)
        else:
            total = total + chunk_loss(h_CD, targets_C)
    return total / (targets_T != -100).sum()


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


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the numerator of MFU.

    6 * active parameters that do compute (every weight a token passes
    through: matmuls, router gates, norms, the output head; the embedding
    lookup not) plus the
    attention score and value products, 6 * 2 * num_layers * num_heads *
    head_dim * seq_len, counted over the whole sequence as in PaLM (Chowdhery et
    al. 2022, appendix B) and torchtitan: causal masking and sliding windows
    are not discounted, so MFU figures stay comparable with theirs.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6.0 * count_parameters(config)["active_non_embedding"] + attention


# Peak dense bf16 TFLOP/s (no sparsity) for model FLOPs utilisation, by device name (NVIDIA's data sheets).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10": 125.0}


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The peak of the longest `PEAK_BF16_TFLOPS` key that the device name holds as whole words ("L4" is not
    found in "L40S", "H100 PCIe" wins over "H100"); None when unknown."""
    import re

    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            return PEAK_BF16_TFLOPS[key]
    return None
