"""Routed SwiGLU experts computed as grouped matrix multiplies.

Shape legend: N routed rows (tokens sorted by expert), D hidden, F expert
hidden, E experts held by this module.

The expert weights are stacked tensors w1_EDF (gate), w3_EDF (up) and
w2_EFD (down). A backend computes, for rows already sorted by expert with
`tokens_per_expert` rows each, `silu(x @ w1[e]) * (x @ w3[e]) @ w2[e]`. The
backend is chosen once at construction from a small registry.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def loop_experts(x_ND: torch.Tensor, tokens_per_expert: torch.Tensor, w1_EDF: torch.Tensor,
                 w2_EFD: torch.Tensor, w3_EDF: torch.Tensor) -> torch.Tensor:
    """Reference: one SwiGLU per expert over its slice of rows."""
    outputs, start = [], 0
    for e, rows in enumerate(tokens_per_expert.tolist()):
        x = x_ND[start:start + rows]
        outputs.append((F.silu(x @ w1_EDF[e]) * (x @ w3_EDF[e])) @ w2_EFD[e])
        start += rows
    return torch.cat(outputs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch's grouped_mm backward rejects expanded (stride-0) gradients such as
    the one `y.sum().backward()` produces.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad.contiguous()


# NOTE: grouped_mm under torch.compile.
# torch 2.13's fake-tensor kernel of grouped_mm accepts only bfloat16 on the CPU,
# so compiling a block that calls it in float32 fails while tracing. Under
# torch.compile the experts call these two custom ops instead: their fake
# implementations give the output shapes, their eager bodies are the same
# F.grouped_mm calls, and the backward is written with them (dX = dY @ W^T per
# expert; dW[e] = X[rows of e]^T @ dY[rows of e], a grouped_mm over the rows).
# Eager execution keeps calling F.grouped_mm directly.
@torch.library.custom_op("moe::grouped_mm", mutates_args=())
def _grouped_mm_op(x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x_ND, w_EDF, offs=offsets)


@_grouped_mm_op.register_fake
def _(x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x_ND.new_empty(x_ND.shape[0], w_EDF.shape[-1])


@torch.library.custom_op("moe::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(x_ND: torch.Tensor, grad_NF: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x_ND.t(), grad_NF, offs=offsets)


@_grouped_mm_weight_grad.register_fake
def _(x_ND: torch.Tensor, grad_NF: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x_ND.new_empty(offsets.shape[0], x_ND.shape[1], grad_NF.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x_ND, w_EDF, offsets = inputs
    ctx.save_for_backward(x_ND, w_EDF, offsets)


def _grouped_mm_backward(ctx, grad_NF: torch.Tensor):
    x_ND, w_EDF, offsets = ctx.saved_tensors
    grad_NF = grad_NF.contiguous()
    # The transposed weights as a view (column-major per expert), as torch's own grouped_mm backward passes
    # them: a copy would be all of the layer's expert weights again at every backward (issue 18, S10).
    grad_x = _grouped_mm_op(grad_NF, w_EDF.transpose(-1, -2), offsets)
    return grad_x, _grouped_mm_weight_grad(x_ND, grad_NF, offsets), None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _grouped_mm_op(x_ND, w_EDF, offsets)
    out = F.grouped_mm(x_ND, w_EDF, offs=offsets)
    return _ContiguousGrad.apply(out) if torch.is_grad_enabled() else out


def grouped_mm_experts(x_ND: torch.Tensor, tokens_per_expert: torch.Tensor, w1_EDF: torch.Tensor,
                       w2_EFD: torch.Tensor, w3_EDF: torch.Tensor) -> torch.Tensor:
    """Dropless grouped GEMM with `torch.nn.functional.grouped_mm` (CPU and CUDA)."""
    if x_ND.dtype not in GROUPED_MM_DTYPES:
        raise TypeError(f"experts.backend='grouped_mm' supports {[str(d) for d in GROUPED_MM_DTYPES]}, got "
                        f"{x_ND.dtype}; use experts.backend='loop' for this dtype")
    if x_ND.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        counts = tokens_per_expert.tolist()  # host memory already on the CPU: no device sync
        if _cpu_loop_is_faster(counts):
            return _active_experts_on_cpu(x_ND, counts, w1_EDF, w2_EFD, w3_EDF)
    offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    h_NF = F.silu(_grouped_mm(x_ND, w1_EDF, offsets)) * _grouped_mm(x_ND, w3_EDF, offsets)
    return _grouped_mm(h_NF, w2_EFD, offsets)


# Rows per active expert above which the Python loop beats F.grouped_mm's CPU kernel, whose per-expert matmuls
# are slower on large blocks: measured on this project's 2-core CPU (E=8, D=128, F=256, float32, medians of 5),
# grouped_mm / loop = 1.2 at 1 token (2 experts active), 0.80 at 2 tokens (4 active), 0.69 at 32 tokens
# (8 active, 8 rows each), 0.77 at 160 tokens (40 rows each), 1.29 at 256 tokens (64 rows each), 1.56 at 1024.
_CPU_GROUPED_MM_MAX_ROWS_PER_EXPERT = 48


def _cpu_loop_is_faster(counts: list[int]) -> bool:
    """Inference on the CPU: loop over the experts with rows (`_active_experts_on_cpu`) when at most two experts
    have rows (a batch-1 decoding step: F.grouped_mm would also visit every empty expert) or when they have many
    rows each; F.grouped_mm's C++ loop in between (a batched decoding step: no Python per expert)."""
    active = [count for count in counts if count]
    return len(active) <= 2 or sum(active) > _CPU_GROUPED_MM_MAX_ROWS_PER_EXPERT * len(active)


def _active_experts_on_cpu(x_ND: torch.Tensor, counts: list[int], w1_EDF: torch.Tensor,
                           w2_EFD: torch.Tensor, w3_EDF: torch.Tensor) -> torch.Tensor:
    """Inference on the CPU: only the experts with rows are multiplied (F.grouped_mm's CPU kernel is a loop of
    one matmul per expert, empty experts included, with a host read of each offset), by the same per-expert
    matmuls (the same output up to the rounding of a multi-threaded matmul: tests/test_experts.py)."""
    out_ND = x_ND.new_empty(x_ND.shape[0], w2_EFD.shape[-1])
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            x = x_ND[rows]
            h = F.silu(torch.mm(x, w1_EDF[expert])) * torch.mm(x, w3_EDF[expert])
            torch.mm(h, w2_EFD[expert], out=out_ND[rows])
            start += count
    return out_ND


def megablocks_experts(x_ND: torch.Tensor, tokens_per_expert: torch.Tensor, w1_EDF: torch.Tensor,
                       w2_EFD: torch.Tensor, w3_EDF: torch.Tensor) -> torch.Tensor:
    """MegaBlocks' grouped GEMM (`megablocks.grouped_gemm_util.ops.gmm`, CUDA only)."""
    from megablocks import grouped_gemm_util as gg  # checked importable at construction

    batch_sizes = tokens_per_expert.to(device="cpu", dtype=torch.int64)
    h_NF = F.silu(gg.ops.gmm(x_ND, w1_EDF, batch_sizes)) * gg.ops.gmm(x_ND, w3_EDF, batch_sizes)
    return gg.ops.gmm(h_NF, w2_EFD, batch_sizes)


def _check_megablocks() -> None:
    try:
        from megablocks import grouped_gemm_util as gg
    except Exception as err:  # ImportError, or a broken CUDA extension
        raise RuntimeError(f"experts.backend='megablocks' needs the optional `megablocks` package, which failed "
                           f"to import ({type(err).__name__}: {err}); install it with `pip install "
                           f"'moe-ray[megablocks]'` on a CUDA machine, or use experts.backend='grouped_mm'") from err
    if not gg.grouped_gemm_is_available():
        raise RuntimeError("experts.backend='megablocks' needs megablocks' grouped_gemm kernels, which are not "
                           "installed; use experts.backend='grouped_mm'")
    if not torch.cuda.is_available():
        raise RuntimeError("experts.backend='megablocks' needs a CUDA GPU and none is visible; "
                           "use experts.backend='grouped_mm'")


EXPERT_BACKENDS: dict[str, ExpertsFn] = {
    "grouped_mm": grouped_mm_experts,
    "megablocks": megablocks_experts,
    "loop": loop_experts,
}


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights.

    Args:
        num_experts: experts held by this module (the local shard under expert
            parallelism).
        hidden_size: D.
        expert_hidden_size: F.
        backend: a key of `EXPERT_BACKENDS`.
    """

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden_size: int, backend: str) -> None:
        super().__init__()
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"unknown experts backend {backend!r}; choose from {sorted(EXPERT_BACKENDS)}")
        if backend == "megablocks":
            _check_megablocks()
        self.backend = backend
        self._compute: ExpertsFn = EXPERT_BACKENDS[backend]
        self.num_experts = num_experts
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, expert_hidden_size))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, expert_hidden_size))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, expert_hidden_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w1_EDF, std=std)
        nn.init.normal_(self.w3_EDF, std=std)
        nn.init.normal_(self.w2_EFD, std=std if out_std is None else out_std)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Args:
            x_ND: rows sorted by expert.
            tokens_per_expert: (E,) integer row counts, summing to N.
        """
        x_ND, (w1_EDF, w2_EFD, w3_EDF) = autocast_experts_inputs(x_ND, (self.w1_EDF, self.w2_EFD, self.w3_EDF))
        return self._compute(x_ND, tokens_per_expert, w1_EDF, w2_EFD, w3_EDF)

    def extra_repr(self) -> str:
        e, d, f = self.w1_EDF.shape
        return f"num_experts={e}, hidden_size={d}, expert_hidden_size={f}, backend={self.backend!r}"


def autocast_experts_inputs(x_ND: torch.Tensor, weights: tuple[torch.Tensor, ...]
                            ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The rows and weights in autocast's dtype when autocast is on: it does not cover grouped GEMMs, so they are
    cast as it casts matmuls."""
    device_type = x_ND.device.type
    if not torch.is_autocast_enabled(device_type):
        return x_ND, weights
    dtype = torch.get_autocast_dtype(device_type)
    return x_ND.to(dtype), tuple(w.to(dtype) for w in weights)


def init_out_std(std: float, num_layers: int) -> float:
    """Scaled init of residual output projections (GPT-2 / Megatron)."""
    return std / math.sqrt(2.0 * num_layers)
