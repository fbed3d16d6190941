"""Training engines: how gradients are reduced, clipped and applied.

The worker loop (cluster/worker.py) only talks to this interface, so the
native engine (our expert-parallel gradient reduction + AdamW) and the
DeepSpeed engine (ZeRO) are interchangeable:

    engine.backward(loss / grad_accum_steps)   # per micro-batch
    grad_norm, stepped = engine.step(lr, loss_is_finite)
    engine.optimizer_state() / engine.load_optimizer_state(tensors)
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.distributed as dist

from moe import update_expert_bias
from moe.router import discard_expert_counts

from cluster.parallel_dims import ParallelDims


class TrainEngine(Protocol):
    model: torch.nn.Module

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulates gradients of one micro-batch (the loss is already divided by the accumulation steps)."""

    def step(self, lr: float, loss_is_finite: bool) -> tuple[float, bool]:
        """Reduces, clips and applies the accumulated gradients, then zeroes them.

        The update (and the aux-loss-free bias update) is skipped when the loss
        or the global gradient norm is not finite. Returns (grad_norm, stepped).
        """

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer state as named tensors (for safetensors)."""

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restores what `optimizer_state` returned."""


def build_adamw(model: torch.nn.Module, cfg: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases, embeddings)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "embed_tokens" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8)


def is_expert_param(param: torch.nn.Parameter) -> bool:
    return getattr(param, "is_expert", False)


def global_grad_norm(model: torch.nn.Module, dims: ParallelDims) -> torch.Tensor:
    """The gradient norm of the full model, expert shards included.

    After the gradient reduction, non-expert gradients are identical on all
    ranks and each expert shard is identical across its replicas, so the full
    norm is the local non-expert part plus the expert parts summed over the
    expert-parallel group.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    device = params[0].grad.device
    expert_sq = torch.zeros((), device=device, dtype=torch.float32)
    other_sq = torch.zeros((), device=device, dtype=torch.float32)
    for p in params:
        sq = p.grad.detach().float().square().sum()
        if is_expert_param(p):
            expert_sq += sq
        else:
            other_sq += sq
    if dims.ep > 1:
        dist.all_reduce(expert_sq, group=dims.ep_group)
    return (expert_sq + other_sq).sqrt()


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """Flattens a torch optimizer's per-parameter state into named tensors."""
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{names[param]}::{key}"] = tensor.detach().contiguous().cpu()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                           tensors: dict[str, torch.Tensor]) -> None:
    by_name = {name: param for param, name in names.items()}
    stored = {key.split("::", 1)[0] for key in tensors}
    if stored - set(by_name):
        raise ValueError(f"optimizer state has unknown parameters: {sorted(stored - set(by_name))[:5]}")
    optimizer.state.clear()
    for key, tensor in tensors.items():
        name, field = key.split("::", 1)
        param = by_name[name]
        optimizer.state[param][field] = tensor.clone() if field == "step" else tensor.to(param.device)


class NativeEngine:
    """Our expert-parallel gradient reduction (cluster.expert_parallel) and torch AdamW."""

    def __init__(self, model: torch.nn.Module, dims: ParallelDims, cfg: dict[str, Any]) -> None:
        from cluster.expert_parallel import expert_bias_all_reduce, reduce_gradients

        self.model = model
        self.dims = dims
        self.grad_clip = cfg["grad_clip"]
        self.optimizer = build_adamw(model, cfg)
        self._reduce_gradients = reduce_gradients
        self._names = {p: n for n, p in model.named_parameters()}
        self._bias_all_reduce = expert_bias_all_reduce(dims)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, loss_is_finite: bool) -> tuple[float, bool]:
        self._reduce_gradients(self.model, self.dims)
        norm = global_grad_norm(self.model, self.dims)
        stepped = loss_is_finite and bool(torch.isfinite(norm))
        if stepped:
            if self.grad_clip > 0:
                scale = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale.to(p.grad.dtype))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            update_expert_bias(self.model, all_reduce=self._bias_all_reduce)
        else:
            discard_expert_counts(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        value = float(norm)
        return (value if math.isfinite(value) else float("nan")), stepped

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        return optimizer_tensors(self.optimizer, self._names)

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> None:
        load_optimizer_tensors(self.optimizer, self._names, tensors)


def build_engine(model: torch.nn.Module, dims: ParallelDims, cfg: dict[str, Any]) -> TrainEngine:
    """The engine named by trainer.engine."""
    if cfg["engine"] == "native":
        return NativeEngine(model, dims, cfg)
    if cfg["engine"] == "deepspeed":
        from cluster.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, dims, cfg)
    raise ValueError(f"trainer.engine must be 'native' or 'deepspeed', got {cfg['engine']!r}")
