"""Training engines: how gradients are reduced, clipped and applied.

The worker loop (cluster/worker.py) only talks to this interface, so the
engines are interchangeable:

    native     our bucketed all-reduce of replicated gradients (expert-parallel
               aware) after backward, then torch AdamW
    fsdp       torch's FSDP2 (`cluster.fsdp`): parameters, gradients and AdamW
               state sharded over the data-parallel ranks, reduce-scatter
               overlapped with backward
    deepspeed  DeepSpeed ZeRO stage 1 or 2

    engine.backward(loss / grad_accum_steps, sync=is_last_micro_batch)
    grad_norm, stepped = engine.step(lr, loss_is_finite)
    engine.load_model_state(full_state)   # a checkpoint's, or trainer.init_from's, weights
    engine.load_sharded_model_state(dir)  # a sharded checkpoint's model/ (cluster/sharded_checkpoint.py)
    engine.optimizer_state() / engine.load_optimizer_state(tensors)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch

from moe import update_expert_bias
from moe.router import discard_expert_counts

from cluster.diagnostics import GROUPS, grad_square_sums
from cluster.expert_parallel import expert_bias_all_reduce, load_full_state_dict, reduce_gradients
from cluster.fsdp import apply_fsdp, local_part, reshard, set_gradient_sync
from cluster.optim import build_adamw, load_optimizer_tensors, optimizer_tensors, set_learning_rate
from cluster.parallel_dims import ParallelDims
from cluster.schema import TrainerConfig
from cluster.sharded_checkpoint import load_model


class TrainEngine(Protocol):
    model: torch.nn.Module

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Accumulates gradients of one micro-batch (the loss is already divided by the accumulation steps).
        `sync=False` says more micro-batches of this step follow (an engine may defer its communication)."""

    def step(self, lr: float, loss_is_finite: bool) -> tuple[float, bool]:
        """Reduces, clips and applies the accumulated gradients, then zeroes them.

        The update (and the aux-loss-free bias update) is skipped when the loss
        or the global gradient norm is not finite. Returns (grad_norm, stepped).
        Engines that can also set `last_grad_norms`, the norm of each
        parameter group (`cluster.diagnostics.GROUPS`) before clipping.
        """

    def load_model_state(self, full_state: dict[str, torch.Tensor]) -> None:
        """Loads a full single-process state dict (each rank keeps its part); before `load_optimizer_state`."""

    def load_sharded_model_state(self, directory: Path) -> None:
        """Loads a sharded checkpoint's model/ (each rank reads its parts; collective); before
        `load_optimizer_state`."""

    def optimizer_state(self, to_cpu: bool = True) -> dict[str, torch.Tensor]:
        """This rank's optimizer state as named tensors (for safetensors); `to_cpu=False` leaves them where
        they are (the sharded checkpoint copies them into its own staging buffers)."""

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restores what `optimizer_state` returned."""

    def end_inference(self) -> None:
        """After a forward pass without backward (evaluation, diagnostics): free what it left gathered."""


def global_grad_norm(model: torch.nn.Module, dims: ParallelDims) -> tuple[torch.Tensor, dict[str, float]]:
    """The gradient norm of the full model (expert shards included), and the norm of each parameter group
    (`cluster.diagnostics.GROUPS`), from one pass over the gradients."""
    square_sums_G = grad_square_sums(model, dims)
    group_norms = square_sums_G.sqrt().tolist()  # with float(total) below: the step's two host syncs
    return square_sums_G.sum().sqrt(), dict(zip(GROUPS, group_norms))


class NativeEngine:
    """Our expert-parallel gradient reduction (cluster.expert_parallel) and torch AdamW."""

    def __init__(self, model: torch.nn.Module, dims: ParallelDims, cfg: TrainerConfig) -> None:
        self.model = model
        self.dims = dims
        self.grad_clip = cfg.grad_clip
        self.optimizer = build_adamw(model, cfg)
        self._reduce_gradients = reduce_gradients
        self._names = {p: n for n, p in model.named_parameters()}
        self._bias_all_reduce = expert_bias_all_reduce(dims)
        self.last_grad_norms: dict[str, float] = {}  # per parameter group, of the last step (before clipping)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        loss.backward()

    def step(self, lr: float, loss_is_finite: bool) -> tuple[float, bool]:
        self._reduce_gradients(self.model, self.dims)
        norm, self.last_grad_norms = global_grad_norm(self.model, self.dims)
        stepped = loss_is_finite and bool(torch.isfinite(norm))
        if stepped:
            if self.grad_clip > 0:
                scale = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
                # In place on this rank's shard when FSDP shards the gradient; one foreach kernel, not one per
                # parameter (issue 18, S10). The gradients are float32 (AdamW's master dtype).
                grads = [local_part(p.grad) for p in self.model.parameters() if p.grad is not None]
                torch._foreach_mul_(grads, scale.to(grads[0].dtype))
            set_learning_rate(self.optimizer, lr)
            self.optimizer.step()
            update_expert_bias(self.model, all_reduce=self._bias_all_reduce)
        else:
            discard_expert_counts(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        value = float(norm)
        return (value if math.isfinite(value) else float("nan")), stepped

    def load_model_state(self, full_state: dict[str, torch.Tensor]) -> None:
        load_full_state_dict(self.model, full_state, self.dims)

    def load_sharded_model_state(self, directory: Path) -> None:
        load_model(directory, self.model, self.dims)

    def optimizer_state(self, to_cpu: bool = True) -> dict[str, torch.Tensor]:
        return optimizer_tensors(self.optimizer, self._names, to_cpu=to_cpu)

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> None:
        load_optimizer_tensors(self.optimizer, self._names, tensors)

    def end_inference(self) -> None:
        pass  # nothing is gathered: every rank holds its parameters whole


class FSDPEngine(NativeEngine):
    """torch's FSDP2 over the data-parallel ranks (`cluster.fsdp.apply_fsdp`), the same clipping, AdamW and
    bias update as the native engine: FSDP's reduce-scatter replaces our all-reduce."""

    def __init__(self, model: torch.nn.Module, dims: ParallelDims, cfg: TrainerConfig) -> None:
        apply_fsdp(model, dims, param_dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else None)
        super().__init__(model, dims, cfg)
        self._reduce_gradients = lambda model, dims: None  # done by FSDP during backward

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        set_gradient_sync(self.model, sync)
        loss.backward()

    def end_inference(self) -> None:
        reshard(self.model)  # the root unit keeps its gathered parameters after a forward, for the backward


def build_engine(model: torch.nn.Module, dims: ParallelDims, cfg: TrainerConfig) -> TrainEngine:
    """The engine named by trainer.engine."""
    if cfg.engine == "native":
        return NativeEngine(model, dims, cfg)
    if cfg.engine == "fsdp":
        return FSDPEngine(model, dims, cfg)
    if cfg.engine == "deepspeed":
        from cluster.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, dims, cfg)
    raise ValueError(f"trainer.engine must be 'native', 'fsdp' or 'deepspeed', got {cfg.engine!r}")
