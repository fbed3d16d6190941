"""Torch-only core of the MoE system: config, model, routing, experts, checkpoints.

Importing `moe` needs only torch (and safetensors for checkpoints): no Ray,
Hydra, wandb or DeepSpeed, so the model runs on a bare GPU machine. The names
below load their modules on first use, so that `moe.config` (the schemas that
command lines check before anything starts) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "ExpertsConfig": "moe.config",
    "ModelConfig": "moe.config",
    "MoEOutput": "moe.model",
    "MoETransformer": "moe.model",
    "RouterConfig": "moe.config",
    "count_parameters": "moe.model",
    "load_checkpoint": "moe.checkpoint",
    "save_checkpoint": "moe.checkpoint",
    "update_expert_bias": "moe.router",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'moe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
