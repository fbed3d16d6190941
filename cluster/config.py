"""Structured configs of the training job, registered with Hydra's ConfigStore.

The YAML files under `conf/` extend these schemas (`defaults: [base_trainer]`),
so a misspelt key or a wrongly typed value fails when Hydra composes the
config, before anything starts. `validate_train_config` then checks what types
cannot (values and relations between groups) and names the offending key.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe.config import ACTIVATION_CHECKPOINTING, DISTILL_KINDS, ModelConfig

from cluster.schema import (DTYPES, ENGINES, ClusterConfig, DebugConfig, LoggerConfig,  # noqa: F401 (re-exported)
                            ParallelConfig, TrainerConfig, WandbConfig, WorkerConfig)

def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="parallel", name="base_parallel", node=ParallelConfig)
    cs.store(group="cluster", name="base_cluster", node=ClusterConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
    try:
        from data_pipeline.config import register_configs as register_data_configs
    except ImportError:  # the data group then has no schema, only its YAML
        return
    register_data_configs()


def _fail(key: str, message: str) -> None:
    raise ValueError(f"invalid configuration: {key}: {message}")


def model_config_from(cfg: DictConfig, vocab_size: Optional[int] = None) -> ModelConfig:
    """Builds the validated ModelConfig from `cfg.model`, filling vocab_size from the data if unset."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    if model.get("vocab_size") is None:
        model["vocab_size"] = vocab_size if vocab_size is not None else 1  # placeholder for validation only
    try:
        return ModelConfig.from_dict(model)
    except ValueError as err:
        raise ValueError(f"invalid configuration: model: {err}") from err


def memory_plan(cfg: DictConfig, model_config: ModelConfig):
    """The `moe.plan.MemoryPlan` of one rank of this training layout."""
    from moe.plan import plan_memory

    t, c = cfg.trainer, cfg.cluster
    return plan_memory(model_config, micro_batch=t.global_batch_size // c.num_workers // t.grad_accum_steps,
                       seq_len=cfg.data.seq_len, world_size=c.num_workers, ep=cfg.parallel.ep,
                       activation_checkpointing=t.activation_checkpointing, bf16=t.dtype == "bfloat16",
                       engine=t.engine, zero_stage=t.zero_stage, loss_chunk_tokens=t.loss_chunk_tokens or None,
                       expert_load=cfg.parallel.expert_load)


def gpu_memory_bytes(cfg: DictConfig) -> Optional[float]:
    """cluster.gpu_memory_gib, else the driver's first GPU (None without either)."""
    if cfg.cluster.gpu_memory_gib is not None:
        return cfg.cluster.gpu_memory_gib * 1024 ** 3
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def check_memory_plan(cfg: DictConfig, model_config: ModelConfig) -> None:
    """Refuses a GPU layout whose planned peak per rank exceeds the GPU's memory (before any worker starts)."""
    if not cfg.cluster.use_gpu:
        return
    memory = gpu_memory_bytes(cfg)
    plan = memory_plan(cfg, model_config)
    if memory is not None and plan.peak > memory:
        gib = 1024 ** 3
        raise ValueError(
            f"invalid configuration: cluster.gpu_memory_gib: the planned peak per GPU is {plan.peak / gib:.1f} GiB "
            f"(parameters {plan.parameters / gib:.1f}, gradients {plan.gradients / gib:.1f}, optimizer "
            f"{plan.optimizer / gib:.1f}, activations {plan.activations / gib:.1f}) and the GPU has "
            f"{memory / gib:.1f} GiB; raise parallel.ep, trainer.grad_accum_steps or "
            f"trainer.activation_checkpointing, or lower trainer.global_batch_size "
            f"(python -m cluster.plan prints the plan)")


def validate_train_config(cfg: DictConfig) -> None:
    """Checks values and cross-group relations; raises ValueError naming the key.

    Runs on the driver before Ray starts.
    """
    _check_trainer(cfg.trainer, cfg.cluster, cfg.model)
    _check_cluster(cfg.cluster)
    model = model_config_from(cfg)
    _check_layout(cfg.trainer, cfg.cluster, cfg.parallel, model)
    _check_distill(cfg.trainer.distill)
    if cfg.data.validation_fraction <= 0:
        _fail("data.validation_fraction", f"must be > 0: training evaluates the validation split at the end "
                                          f"(and every trainer.eval_every steps), got {cfg.data.validation_fraction}")
    if cfg.data.seq_len > model.max_seq_len:
        _fail("data.seq_len", f"({cfg.data.seq_len}) exceeds model.max_seq_len ({model.max_seq_len})")
    if cfg.logger.wandb.mode not in ("offline", "online", "disabled"):
        _fail("logger.wandb.mode", f"must be offline, online or disabled, got {cfg.logger.wandb.mode!r}")
    from data_pipeline.config import DataConfig

    DataConfig.from_any(cfg.data)  # the data group's own checks (ValueError naming the key), before any work


def _check_trainer(t: DictConfig, c: DictConfig, model_cfg: DictConfig) -> None:
    """The trainer group's values (and the attention backend it can train)."""
    for key in ("max_steps", "global_batch_size", "grad_accum_steps", "checkpoint_every", "keep_last",
                "eval_batches", "max_bad_steps"):
        if not isinstance(t[key], int) or t[key] <= 0:
            _fail(f"trainer.{key}", f"must be a positive integer, got {t[key]!r}")
    if not (t.router_lr_scale > 0 and math.isfinite(t.router_lr_scale)):
        _fail("trainer.router_lr_scale", f"must be a positive number, got {t.router_lr_scale}")
    if t.checkpoint_format not in ("full", "sharded"):
        _fail("trainer.checkpoint_format", f"must be 'full' or 'sharded', got {t.checkpoint_format!r}")
    if t.engine not in ENGINES:
        _fail("trainer.engine", f"must be one of {list(ENGINES)}, got {t.engine!r}")
    if model_cfg.get("attention_backend", "sdpa") == "flex" and not c.use_gpu:
        _fail("model.attention_backend", "flex needs cluster.use_gpu=true to train: torch's FlexAttention has no "
                                          "CPU backward; use model.attention_backend=sdpa on the CPU")
    if t.dtype not in DTYPES:
        _fail("trainer.dtype", f"must be one of {list(DTYPES)}, got {t.dtype!r}")
    if not (math.isfinite(t.lr) and t.lr > 0):
        _fail("trainer.lr", f"must be a positive number, got {t.lr}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        _fail("trainer.min_lr_ratio", f"must lie in [0, 1] (the final learning rate is lr * min_lr_ratio), "
                                      f"got {t.min_lr_ratio}")
    if not (math.isfinite(t.grad_clip) and t.grad_clip >= 0):
        _fail("trainer.grad_clip", f"must be >= 0 (0 turns clipping off), got {t.grad_clip}")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        _fail("trainer.weight_decay", f"must be >= 0, got {t.weight_decay}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= t[key] < 1.0:
            _fail(f"trainer.{key}", f"must lie in [0, 1), got {t[key]}")
    if t.debug.kill_rank_at_step is not None and not 0 <= t.debug.kill_rank < c.num_workers:
        _fail("trainer.debug.kill_rank", f"must name one of the {c.num_workers} workers, got {t.debug.kill_rank}")
    for key in ("warmup_steps", "eval_every", "diagnostics_every"):
        if not isinstance(t[key], int) or t[key] < 0:
            _fail(f"trainer.{key}", f"must be a non-negative integer, got {t[key]!r}")
    if not isinstance(t.loss_chunk_tokens, int) or t.loss_chunk_tokens < 0:
        _fail("trainer.loss_chunk_tokens", f"must be a non-negative integer (0 = off), got {t.loss_chunk_tokens!r}")
    if t.loss_chunk_tokens and t.distill.teacher is not None:
        _fail("trainer.loss_chunk_tokens", "distillation (trainer.distill.teacher) needs the student's whole "
                                           "logits: set trainer.loss_chunk_tokens=0")
    if t.zero_stage not in (1, 2):
        _fail("trainer.zero_stage", f"must be 1 or 2, got {t.zero_stage}")
    if t.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        _fail("trainer.activation_checkpointing",
              f"must be one of {list(ACTIVATION_CHECKPOINTING)}, got {t.activation_checkpointing!r}")


def _check_cluster(c: DictConfig) -> None:
    if c.num_workers <= 0:
        _fail("cluster.num_workers", f"must be positive, got {c.num_workers}")
    if c.cpus_per_worker <= 0:
        _fail("cluster.cpus_per_worker", f"must be positive, got {c.cpus_per_worker}")
    for name, amount in c.worker_resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            _fail(f"cluster.worker_resources.{name}", "custom resources only: CPU and GPU are set by "
                  "cluster.cpus_per_worker and cluster.use_gpu")
        if not (isinstance(amount, (int, float)) and math.isfinite(amount) and amount > 0):
            _fail(f"cluster.worker_resources.{name}", f"must be a positive number, got {amount!r}")
    if c.max_failures < 0:
        _fail("cluster.max_failures", f"must be non-negative, got {c.max_failures}")
    if c.num_cpus is not None and c.num_cpus <= 0:
        _fail("cluster.num_cpus", f"must be positive or null (all CPUs of the machine), got {c.num_cpus}")
    if c.gpu_memory_gib is not None and not (math.isfinite(c.gpu_memory_gib) and c.gpu_memory_gib > 0):
        _fail("cluster.gpu_memory_gib", f"must be a positive number of GiB or null, got {c.gpu_memory_gib}")
    if not 1 <= c.dashboard_port <= 65535:
        _fail("cluster.dashboard_port", f"must be a TCP port in 1..65535, got {c.dashboard_port}")


def _check_layout(t: DictConfig, c: DictConfig, p: DictConfig, model: ModelConfig) -> None:
    """How the workers, the expert-parallel groups, the batch and the experts divide each other."""
    if p.ep <= 0:
        _fail("parallel.ep", f"must be positive, got {p.ep}")
    load = p.expert_load
    if load is not None and not (isinstance(load, (int, float)) and math.isfinite(load) and load >= 1):
        _fail("parallel.expert_load", f"must be a number >= 1 (the hottest rank's expert rows over the mean) or "
                                      f"null (the most routing can send one rank), got {load!r}")
    if c.num_workers % p.ep:
        _fail("parallel.ep", f"({p.ep}) must divide cluster.num_workers ({c.num_workers})")
    per_step = c.num_workers * t.grad_accum_steps
    if t.global_batch_size % per_step:
        _fail("trainer.global_batch_size", f"({t.global_batch_size}) must be divisible by cluster.num_workers * "
                                           f"trainer.grad_accum_steps ({per_step})")
    if model.num_moe_layers and model.experts.num_experts % p.ep:
        _fail("parallel.ep", f"({p.ep}) must divide model.experts.num_experts ({model.experts.num_experts})")
    if t.engine == "deepspeed" and p.ep > 1 and model.experts.backend == "megablocks":
        _fail("model.experts.backend", "megablocks is not supported with trainer.engine=deepspeed")
    if model.experts.backend == "megablocks" and t.dtype != "bfloat16":
        _fail("model.experts.backend", f"megablocks' grouped GEMM (gmm) runs in bfloat16 only: set "
                                       f"trainer.dtype=bfloat16, or use model.experts.backend=grouped_mm "
                                       f"(trainer.dtype is {t.dtype})")


def _check_distill(d: DictConfig) -> None:
    if not (isinstance(d.weight, (int, float)) and 0.0 <= d.weight <= 1.0):
        _fail("trainer.distill.weight", f"must lie in [0, 1] (the share of the distillation loss), got {d.weight}")
    if not (isinstance(d.temperature, (int, float)) and math.isfinite(d.temperature) and d.temperature > 0):
        _fail("trainer.distill.temperature", f"must be a positive number, got {d.temperature}")
    if d.kind not in DISTILL_KINDS:
        _fail("trainer.distill.kind", f"must be one of {list(DISTILL_KINDS)}, got {d.kind!r}")


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out
