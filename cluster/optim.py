"""The optimizer both training engines build, and its state as named tensors.

Engine-neutral: `cluster/engine.py` (native) and `cluster/deepspeed_engine.py`
(ZeRO) both use `build_adamw`, so the two engines decay the same parameters
with the same hyperparameters.
"""

from __future__ import annotations


import math

import torch
from torch.distributed.tensor import DTensor

from cluster.fsdp import is_sharded, local_part
from cluster.schema import TrainerConfig


def build_adamw(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases, embeddings), and the routers' learning
    rate scaled by trainer.router_lr_scale. Each group carries a "name" and an "lr_scale": an engine sets
    `group["lr"] = lr * group["lr_scale"]` at every step."""
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        decay = param.dim() >= 2 and "embed_tokens" not in name
        router = ".router." in name
        key = ("router_" if router else "") + ("decay" if decay else "no_decay")
        group = groups.setdefault(key, {"params": [], "name": key, "weight_decay": cfg.weight_decay if decay else 0.0,
                                        "lr_scale": cfg.router_lr_scale if router else 1.0})
        group["params"].append(param)
    return torch.optim.AdamW(list(groups.values()), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps."""
    lr, warmup, total = cfg.lr, cfg.warmup_steps, cfg.max_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr * cfg.min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The step's learning rate on every group, times the group's scale (`build_adamw`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str], *,
                      to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """Flattens a torch optimizer's per-parameter state into named tensors (this rank's shard of
    FSDP-sharded state), on the CPU or (`to_cpu=False`) where they are: on the CPU these are the optimizer's
    own tensors, to be copied before the next step changes them."""
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensor = (local_part(value) if torch.is_tensor(value) else torch.tensor(value)).detach().contiguous()
            out[f"{names[param]}::{key}"] = tensor.cpu() if to_cpu else tensor
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                           tensors: dict[str, torch.Tensor]) -> None:
    """Restores what `optimizer_tensors` returned, into the same parameters of the same layout.

    Raises:
        ValueError naming the first unknown parameter, or a state tensor whose shape is not this rank's
        (the checkpoint was written with another engine or parallel layout).
    """
    by_name = {name: param for param, name in names.items()}
    stored = {key.split("::", 1)[0] for key in tensors}
    if stored - set(by_name):
        raise ValueError(f"optimizer state has unknown parameters: {sorted(stored - set(by_name))[:5]}")
    for key, tensor in tensors.items():
        name, field = key.split("::", 1)
        local = local_part(by_name[name])
        if field != "step" and tensor.shape != local.shape:
            raise ValueError(f"optimizer state {key} has shape {tuple(tensor.shape)}, this rank's parameter "
                             f"has {tuple(local.shape)}: the checkpoint was written with another trainer.engine "
                             f"or parallel layout")
    optimizer.state.clear()
    for key, tensor in tensors.items():
        name, field = key.split("::", 1)
        param = by_name[name]
        tensor = tensor.clone() if field == "step" else tensor.to(param.device, copy=True)  # never shared
        if field != "step" and is_sharded(param):
            tensor = DTensor.from_local(tensor, param.device_mesh, param.placements, run_check=False,
                                        shape=param.shape, stride=param.stride())
        optimizer.state[param][field] = tensor
