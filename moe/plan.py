"""Memory plan of a training layout: what one rank holds at its peak, from the config alone.

    python -m cluster.plan +experiment=mixtral_small cluster.num_workers=8 parallel.ep=8 cluster.gpu_memory_gib=80

prints parameters, gradients, optimizer state, activations (with and without
activation checkpointing) and the estimated peak of one rank, and exits with
status 1 when the peak does not fit `cluster.gpu_memory_gib`. `moe.train`
makes the same check before Ray starts when it trains on GPUs.

The model (torch only, importable anywhere):
- Parameters are float32 (autocast computes in bfloat16). With the native
  engine every rank holds the non-expert parameters and 1/ep of the experts,
  their gradients (float32) and AdamW's two moments (float32). DeepSpeed ZeRO
  shards the optimizer state (stage 1) and the gradients (stage 2) over the
  data-parallel ranks of each parameter, and adds its float32 gradient
  reduction buckets (`DEEPSPEED_REDUCE_BUCKET_ELEMENTS` each): one, or two
  at stage 2, where the reduction overlaps the backward (`overlap_comm`). FSDP2 (engine "fsdp") shards all
  three; in their place a rank holds the unsharded parameters of the root
  unit (embeddings, head, final norm) throughout, and of at most two blocks
  at a time (the one computing and the one prefetched), plus one block's
  unsharded gradients during its backward.
- Activations: the tensors autograd saves per token and block, counted op by
  op from this implementation (`_block_units`); float32 on the CPU, and with
  bfloat16 autocast the matmul products in 2 bytes and the residual stream
  and norms in 4. Dropless routing sends top_k copies of every token to the
  experts, whatever the balance; under expert parallelism the rank of the
  hottest experts receives more than its share of them: `expert_load` times
  the mean, at most all its experts can take (`max_expert_load`). A rank's
  expert activations are sized for it (the default: that maximum, which
  dropless routing can reach; training metrics record each expert's
  max_over_mean_load). `full` checkpointing keeps each block's
  input plus one block's activations (its recomputation); `selective` keeps
  every other block whole.
- Peak, in a step after the first (the optimizer state exists): the larger of
  the start of the backward pass (parameters, optimizer state, every saved
  activation, the logits' gradients; no parameter gradient yet) and, with
  checkpointing, the recomputation of the largest checkpointed block (all
  gradients counted as allocated, the other blocks' inputs).
Checked against torch's MemTracker on the CPU (tests/test_plan.py, within
the tolerance stated there); the bfloat16 figures are the same count with
other element sizes and have not been measured on a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from moe.config import ModelConfig
from moe.model import count_parameters

GIB = 1024 ** 3
CHECKPOINTING = ("none", "full", "selective")


@dataclass
class MemoryPlan:
    """Bytes per rank. `activations` is for the configured checkpointing, `activations_by_mode` for each."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    logits_grad: int
    activations_by_mode: dict[str, int]
    tokens_per_micro_batch: int
    peak: int
    expert_load: float = 1.0  # the hottest rank's expert rows over the mean that the activations are sized for

    def to_dict(self) -> dict:
        return asdict(self)


# DeepSpeed ZeRO's gradient reduction bucket (`reduce_bucket_size`, float32 elements; cluster/deepspeed_engine.py).
# Its default, 5e8, is 2 GB a bucket, and ZeRO-2's overlapped reduction keeps two; 5e7 is a tenth of that and
# still reduces mixtral_small's 1.5B parameters' gradients in about 30 collectives a step.
DEEPSPEED_REDUCE_BUCKET_ELEMENTS = 50_000_000

def _split_parameters(config: ModelConfig) -> tuple[int, int]:
    """(non-expert, routed-expert) parameter counts of the whole model."""
    total = count_parameters(config)["total"]
    experts = config.num_moe_layers * 3 * config.hidden_size * config.experts.hidden_size * config.experts.num_experts
    return total - experts, experts


def _fsdp_units(config: ModelConfig, ep: int) -> tuple[int, int]:
    """(root unit, largest block) parameter counts one rank gathers under FSDP: the root holds the embeddings,
    the output head (once when tied) and the final norm; a block its attention, norms and feed-forward (1/ep of
    the routed experts)."""
    d, v = config.hidden_size, config.vocab_size
    root = v * d * (1 if config.tie_embeddings else 2) + d
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attention = 2 * d * q + 2 * d * kv + 2 * d  # q, o; k, v; the two norms
    blocks = []
    for layer in range(config.num_layers):
        if config.is_moe_layer(layer):
            experts = config.experts
            shared = 3 * d * experts.num_shared_experts * (experts.shared_hidden_size or experts.hidden_size)
            blocks.append(attention + d * experts.num_experts + 3 * d * experts.hidden_size * experts.num_experts
                          // ep + shared)
        else:
            blocks.append(attention + 3 * d * config.dense_hidden_size)
    return root, max(blocks)


def max_expert_load(config: ModelConfig, ep: int) -> float:
    """The most expert rows one rank can receive under dropless routing, over the mean (top_k per token): every
    token of the `ep` ranks, each sending min(top_k, experts per rank) copies."""
    k, e = config.router.top_k, config.experts.num_experts
    return ep * min(k, e // ep) / k


def _block_units(config: ModelConfig, seq_len: int, masked: bool, moe: bool,
                 expert_load: float = 1.0) -> tuple[float, float]:
    """Saved elements per token of one block: (float32 elements, matmul elements).

    Float32 elements stay 4 bytes under autocast (residual stream, norms,
    softmax statistics, masks, integer indices counted in 4-byte units);
    matmul elements are the projections' inputs and outputs (2 bytes in bfloat16).
    `expert_load` scales the rows the rank's experts compute (received rows,
    w1, w3, silu, product, w2 out); the gates' weighting of the returned rows
    stays one per routed copy.
    """
    d, hd, h, g = config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads
    resid = 2 * (3 * d + 1)  # per norm: its input, 1/rms, its output and the weighted output
    attn_mm = (2 * h + 2 * g) * hd + d  # q, k (before and after rotary), v, attention output, o_proj input
    attn_f32 = h + (seq_len if masked else 0)  # log-sum-exp; SDPA's explicit mask as float per layer
    if not moe:
        return resid + attn_f32, attn_mm + 4 * config.dense_hidden_size  # w1, w3, silu, product
    k, e, f = config.router.top_k, config.experts.num_experts, config.experts.hidden_size
    router = e + 3 * k + 1  # probabilities, top-k ids (int64) and weights, normaliser
    dispatch = 3 * k + 2 * k  # permutation indices (int64), gates, counts
    experts_mm = expert_load * (k * d + 4 * k * f + k * d) + k * d  # received, w1, w3, silu, product, w2; weighted
    shared = 0
    if config.experts.num_shared_experts:
        shared = 4 * config.experts.num_shared_experts * (config.experts.shared_hidden_size or f)
    return resid + attn_f32 + router + dispatch, attn_mm + experts_mm + shared


def plan_memory(config: ModelConfig, *, micro_batch: int, seq_len: int, world_size: int = 1, ep: int = 1,
                activation_checkpointing: str = "none", bf16: bool = False, documents: bool = True,
                engine: str = "native", zero_stage: int = 1, loss_chunk_tokens: Optional[int] = None,
                expert_load: Optional[float] = None) -> MemoryPlan:
    """The memory plan of one rank (see the module docstring).

    Args:
        config: the model.
        micro_batch: sequences per forward pass on one rank.
        seq_len: tokens per sequence.
        world_size, ep: ranks and expert-parallel degree.
        activation_checkpointing: "none", "full" or "selective".
        bf16: bfloat16 autocast (matmul activations in 2 bytes).
        documents: batches carry document ids (packed data), so SDPA gets an
            explicit mask; FlexAttention and plain causal attention build none.
        engine, zero_stage: "native", "fsdp", or "deepspeed" with ZeRO stage 1 or 2.
        loss_chunk_tokens: the loss computed that many tokens at a time
            (`moe.model.chunked_cross_entropy`): no logits are saved, and the
            logits' transients are one chunk's.
        expert_load: the expert rows of the rank with the hottest experts
            over the mean, >= 1 (see the module docstring); capped at
            `max_expert_load`, its default. 1 with ep = 1 (all experts local).
    """
    if activation_checkpointing not in CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {list(CHECKPOINTING)}, "
                         f"got {activation_checkpointing!r}")
    if world_size % ep:
        raise ValueError(f"ep ({ep}) must divide world_size ({world_size})")
    if expert_load is not None and not expert_load >= 1:
        raise ValueError(f"expert_load must be >= 1 (the hottest rank's expert rows over the mean), got {expert_load}")
    most = max_expert_load(config, ep)
    load = most if expert_load is None else min(expert_load, most)
    non_expert, experts = _split_parameters(config)
    local_params = non_expert + experts // ep
    parameters = 4 * local_params
    gradients = 4 * local_params
    optimizer = 8 * local_params
    if engine == "fsdp":
        sharded = non_expert / world_size + experts / ep / (world_size // ep)
        root, block = _fsdp_units(config, ep)
        transient = 4 * (root + 2 * block) if world_size > 1 else 0  # one rank: FSDP keeps no second copy
        parameters = int(4 * sharded) + transient
        gradients = int(4 * sharded) + (4 * block if world_size > 1 else 0)
        optimizer = int(8 * sharded)
    elif engine == "deepspeed":  # ZeRO shards over each parameter's data-parallel ranks
        sharded = 8 * (non_expert / world_size + experts / ep / (world_size // ep))
        optimizer = int(sharded)
        if zero_stage >= 2:
            gradients = int(sharded / 2)
        gradients += 4 * DEEPSPEED_REDUCE_BUCKET_ELEMENTS * (2 if zero_stage >= 2 else 1)

    tokens = micro_batch * seq_len
    mm_bytes = 2 if bf16 else 4
    masked = config.attention_backend == "sdpa" and (documents or config.sliding_window is not None)
    blocks = []
    for layer in range(config.num_layers):
        f32, mm = _block_units(config, seq_len, masked, config.is_moe_layer(layer), load)
        blocks.append(int(tokens * (4 * f32 + mm_bytes * mm)))
    block_input = 4 * tokens * config.hidden_size
    # final norm; log-softmax output (float32); the logits the caller holds (float32, or bfloat16 logits).
    # In chunks, only the final norm's are saved: a chunk's logits live during its recomputation in the backward.
    logit_tokens = tokens if loss_chunk_tokens is None else min(tokens, loss_chunk_tokens)
    head = tokens * 4 * (3 * config.hidden_size + 1)
    head_logits = logit_tokens * (4 * config.vocab_size + mm_bytes * config.vocab_size)
    if loss_chunk_tokens is None:
        head += head_logits
    kept = {"none": blocks,
            "full": [block_input] * len(blocks),
            "selective": [b if i % 2 == 0 else block_input for i, b in enumerate(blocks)]}
    by_mode = {mode: sum(saved) + head for mode, saved in kept.items()}
    logits_grad = 2 * 4 * logit_tokens * config.vocab_size  # the gradients of the log-softmax and of the logits
    if loss_chunk_tokens is not None:
        logits_grad += head_logits  # the recomputed chunk
    activations = by_mode[activation_checkpointing]
    # Two candidate peaks: the start of the backward pass (every activation saved, no gradient yet), and for
    # checkpointing the backward pass of the largest recomputed block (all gradients, the blocks' inputs).
    peak = parameters + optimizer + activations + logits_grad
    if activation_checkpointing != "none":
        recomputed = max(b for b, k in zip(blocks, kept[activation_checkpointing]) if b != k) \
            if any(b != k for b, k in zip(blocks, kept[activation_checkpointing])) else 0
        peak = max(peak, parameters + optimizer + gradients + sum(kept[activation_checkpointing]) + recomputed)
    return MemoryPlan(parameters, gradients, optimizer, activations, logits_grad, by_mode, tokens, peak, load)


def format_plan(plan: MemoryPlan, gpu_memory_bytes: Optional[float] = None) -> str:
    rows = [("parameters", plan.parameters), ("gradients", plan.gradients), ("optimizer state", plan.optimizer),
            (f"activations ({plan.tokens_per_micro_batch} tokens, expert load {plan.expert_load:g}x)",
             plan.activations),
            ("logits gradient", plan.logits_grad), ("peak", plan.peak)]
    lines = [f"{name:<50}{value / GIB:>10.3f} GiB" for name, value in rows]
    lines.append("activations by checkpointing: " + ", ".join(
        f"{mode} {value / GIB:.3f} GiB" for mode, value in plan.activations_by_mode.items()))
    if gpu_memory_bytes:
        verdict = "fits" if plan.peak <= gpu_memory_bytes else "DOES NOT FIT"
        lines.append(f"GPU memory {gpu_memory_bytes / GIB:.1f} GiB: {verdict} "
                     f"({100 * plan.peak / gpu_memory_bytes:.0f}% of it)")
    return "\n".join(lines)


def main() -> None:
    """The command moved to `python -m cluster.plan` (it composes the training config, which lives above `moe/`)."""
    import sys

    print("error: the memory plan's command is `python -m cluster.plan +experiment=NAME [overrides]` "
          "(moe.plan holds the torch-only plan functions)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
