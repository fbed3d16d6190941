"""Typed, validated configuration of the MoE transformer.

Three small dataclasses, one per component: `RouterConfig` (routing and load
balancing), `ExpertsConfig` (expert sizes and the grouped-GEMM backend) and
`ModelConfig` (the transformer that holds them). Each validates itself at
construction and raises `ValueError` naming the offending field, so that a bad
value fails before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

SCORE_FUNCS = ("softmax", "sigmoid")
ATTENTION_BACKENDS = ("sdpa", "flex")
DROP_POLICIES = ("probs", "position")
EXPERT_BACKENDS = ("grouped_mm", "megablocks", "loop")


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def _check_non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a non-negative number, got {value!r}")


def _check_choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ValueError(f"{type(obj).__name__}.{name} must be one of {list(choices)}, got {value!r}")

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")  # MoETransformer.set_activation_checkpointing
DISTILL_KINDS = ("forward_kl", "reverse_kl")  # moe/distill.py; here so that config checks need no torch


@dataclass
class RouterConfig:
    """Token-choice top-k routing and its load-balancing terms.

    Attributes:
        top_k: experts chosen per token.
        score_func: "softmax" (Mixtral) or "sigmoid" (DeepSeek-V3) scores.
        renormalize: renormalise the gate weights over the chosen k experts
            (Mixtral does for softmax; DeepSeek-V3 always does for sigmoid).
        route_scale: constant multiplier of the gate weights (DeepSeek-V3).
        jitter_eps: multiplicative uniform jitter of the router input in
            training (Switch Transformer); 0 disables it.
        aux_loss_coef: weight of the Switch/GShard load-balancing loss
            `E * sum_i f_i * P_i` of each MoE layer (the model sums the
            layers' weighted losses, as the papers do; so do the next two).
        seq_aux_loss_coef: weight of the sequence-wise balance loss
            (DeepSeek-V2/V3).
        z_loss_coef: weight of the ST-MoE router z-loss.
        bias_update_rate: gamma of auxiliary-loss-free balancing (DeepSeek-V3);
            0 disables the per-expert selection bias.
        capacity_factor: None for dropless routing; otherwise each expert keeps
            at most ceil(capacity_factor * tokens * top_k / num_experts)
            assignments and the rest are dropped.
        drop_policy: which assignments an over-full expert keeps: the highest
            gate probabilities ("probs") or the earliest tokens ("position").
    """

    top_k: int = 2
    score_func: str = "softmax"
    renormalize: bool = True
    route_scale: float = 1.0
    jitter_eps: float = 0.0
    aux_loss_coef: float = 0.01
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"

    def __post_init__(self) -> None:
        _check_positive(self, "top_k")
        _check_choice(self, "score_func", SCORE_FUNCS)
        _check_choice(self, "drop_policy", DROP_POLICIES)
        _check_non_negative(self, "jitter_eps", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef",
                            "bias_update_rate")
        if not self.route_scale > 0:
            raise ValueError(f"RouterConfig.route_scale must be positive, got {self.route_scale!r}")
        if self.jitter_eps >= 1:
            raise ValueError(f"RouterConfig.jitter_eps must be < 1, got {self.jitter_eps!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"RouterConfig.capacity_factor must be positive or None (dropless), got {self.capacity_factor!r}")


@dataclass
class ExpertsConfig:
    """The routed (and optional shared) SwiGLU experts of one MoE layer.

    Attributes:
        num_experts: routed experts per MoE layer.
        hidden_size: intermediate size f of each routed expert.
        backend: grouped-matmul backend: "grouped_mm" (torch's native grouped
            GEMM, CPU and CUDA), "megablocks" (CUDA with megablocks installed)
            or "loop" (a per-expert loop, the numerical reference).
        num_shared_experts: always-active experts (DeepSeek-style), fused into
            one SwiGLU of width num_shared_experts * shared_hidden_size.
        shared_hidden_size: intermediate size of each shared expert; defaults
            to `hidden_size`.
    """

    num_experts: int = 8
    hidden_size: int = 512
    backend: str = "grouped_mm"
    num_shared_experts: int = 0
    shared_hidden_size: Optional[int] = None

    def __post_init__(self) -> None:
        _check_positive(self, "num_experts", "hidden_size")
        _check_choice(self, "backend", EXPERT_BACKENDS)
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(
                f"ExpertsConfig.num_shared_experts must be a non-negative integer, got {self.num_shared_experts!r}")
        if self.shared_hidden_size is not None:
            _check_positive(self, "shared_hidden_size")


@dataclass
class ModelConfig:
    """A Mixtral-family decoder-only transformer.

    Layer i is a MoE layer when `i >= first_k_dense`; earlier layers use a
    dense SwiGLU of width `dense_hidden_size`. `first_k_dense = num_layers`
    gives a fully dense model (the dense baseline).

    Attributes:
        vocab_size, hidden_size, num_layers, num_heads: the usual sizes.
        num_kv_heads: key/value heads for grouped-query attention; must divide
            num_heads. Defaults to num_heads.
        head_dim: defaults to hidden_size // num_heads.
        max_seq_len: longest sequence the rotary cache is built for.
        rope_theta: rotary base.
        rms_norm_eps: RMSNorm epsilon.
        sliding_window: attend only to the last `sliding_window` positions
            (Mistral); None for full causal attention.
        attention_backend: how document and sliding-window masks are applied
            in training: "sdpa" (an explicit boolean (B, 1, S, S) mask) or "flex"
            (FlexAttention block masks built once per batch, compiled; no S x S
            mask; torch has no CPU backward for it, so training needs a GPU).
            Plain causal attention always takes SDPA's is_causal path.
        tie_embeddings: share the token embedding and the output head.
        first_k_dense: number of leading dense layers.
        dense_hidden_size: width of the dense SwiGLU layers (defaults to
            top_k * experts.hidden_size, the active width of a MoE layer).
        init_std: standard deviation of the weight initialisation.
        router, experts: the MoE components.
    """

    vocab_size: Optional[int] = 32000
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_seq_len: int = 2048
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-5
    sliding_window: Optional[int] = None
    attention_backend: str = "sdpa"
    tie_embeddings: bool = False
    first_k_dense: int = 0
    dense_hidden_size: Optional[int] = None
    init_std: float = 0.02
    router: RouterConfig = field(default_factory=RouterConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = RouterConfig(**self.router)
        if isinstance(self.experts, dict):
            self.experts = ExpertsConfig(**self.experts)
        _check_positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        _check_positive(self, "num_kv_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_kv_heads ({self.num_kv_heads}) must divide "
                             f"ModelConfig.num_heads ({self.num_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must divide "
                                 f"ModelConfig.hidden_size ({self.hidden_size}) when head_dim is not set")
            self.head_dim = self.hidden_size // self.num_heads
        _check_positive(self, "head_dim")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        _check_choice(self, "attention_backend", ATTENTION_BACKENDS)
        if self.attention_backend == "flex" and self.head_dim < 16:
            raise ValueError(f"ModelConfig.head_dim must be >= 16 with attention_backend='flex' (Triton's "
                             f"FlexAttention kernels need it), got {self.head_dim}")
        if self.sliding_window is not None:
            _check_positive(self, "sliding_window")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not self.init_std > 0:
            raise ValueError(f"ModelConfig.init_std must be positive, got {self.init_std!r}")
        if not isinstance(self.first_k_dense, int) or not 0 <= self.first_k_dense <= self.num_layers:
            raise ValueError(f"ModelConfig.first_k_dense must be in [0, num_layers={self.num_layers}], "
                             f"got {self.first_k_dense!r}")
        if self.dense_hidden_size is None:
            self.dense_hidden_size = self.router.top_k * self.experts.hidden_size
        _check_positive(self, "dense_hidden_size")
        if self.num_moe_layers and self.router.top_k > self.experts.num_experts:
            raise ValueError(f"RouterConfig.top_k ({self.router.top_k}) must be <= "
                             f"ExpertsConfig.num_experts ({self.experts.num_experts})")
        if self.num_moe_layers and self.experts.backend == "grouped_mm":
            # torch's grouped GEMM needs 16-byte aligned strides: multiples of 8
            # elements cover float32, bfloat16 and float16.
            for name, value in (("ModelConfig.hidden_size", self.hidden_size),
                                ("ExpertsConfig.hidden_size", self.experts.hidden_size)):
                if value % 8:
                    raise ValueError(f"{name} must be a multiple of 8 for experts.backend='grouped_mm' "
                                     f"(16-byte aligned strides), got {value}; use experts.backend='loop'")

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Builds a config from a (possibly nested) mapping, rejecting unknown keys by name."""
        data = dict(data)
        nested = {"router": RouterConfig, "experts": ExpertsConfig}
        for key, sub_cls in nested.items():
            if key in data and isinstance(data[key], dict):
                data[key] = _strict_init(sub_cls, data[key], prefix=f"{key}.")
        return _strict_init(cls, data)


def _strict_init(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(prefix + k for k in unknown)}")
    return cls(**data)
