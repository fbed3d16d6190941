"""Torch-only core of the MoE system: config, model, routing, experts, checkpoints.

Importing `moe` needs only torch (and safetensors for checkpoints): no Ray,
Hydra, wandb or DeepSpeed, so the model runs on a bare GPU machine.
"""

from moe.checkpoint import load_checkpoint, save_checkpoint
from moe.config import ExpertsConfig, ModelConfig, RouterConfig
from moe.model import MoEOutput, MoETransformer, count_parameters
from moe.router import update_expert_bias

__all__ = [
    "ExpertsConfig",
    "ModelConfig",
    "MoEOutput",
    "MoETransformer",
    "RouterConfig",
    "count_parameters",
    "load_checkpoint",
    "save_checkpoint",
    "update_expert_bias",
]
