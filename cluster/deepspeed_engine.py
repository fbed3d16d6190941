"""`trainer.engine=deepspeed`: ZeRO stage 1 or 2 behind the `TrainEngine` interface.

The worker loop (cluster/worker.py) stays the same as with the native engine:
it calls the model itself, `backward` once per micro-batch with the loss
already divided by `grad_accum_steps`, then `step` once. DeepSpeed partitions
the AdamW state (ZeRO-1) and also the gradients (ZeRO-2) over each
parameter's data-parallel group and does the reduction, clipping, NaN
skipping and update; this file only adapts the interface.

NOTE: how the pieces are wired to DeepSpeed 0.19.
1. Gradient accumulation. DeepSpeed runs with
   `managed_gradient_accumulation: false`: `backward` only accumulates (ZeRO-2
   already reduces into its gradient partitions), and `step` is always the
   accumulation boundary, which is exactly the worker's contract. The loss
   arrives divided by grad_accum_steps, so `backward(scale_wrt_gas=False)`
   keeps DeepSpeed from dividing again; `gradient_accumulation_steps` is set
   to the real value only for DeepSpeed's batch bookkeeping.
2. The backward prologue. `DeepSpeedEngine.forward` resets ZeRO's per-step
   hook state and hooks `_backward_prologue` onto the outputs (tensors,
   tuples and dicts only, so not a `MoEOutput`): the accumulation-boundary
   flag, ZeRO's hook counters and DeepSpeed's timers. The worker calls the
   model directly (ZeRO's gradient hooks sit on the parameters and fire
   anyway), so `backward` runs both itself before `engine.backward`.
3. Expert parameters. `apply_expert_parallel` marks them the way
   `deepspeed.moe.utils.is_moe_param` expects (`allreduce = False`,
   `group_name = "ep_size_{ep}"`). The optimizer groups are split with
   `split_params_into_different_moe_groups_for_optimizer`, so every expert
   group is partitioned, reduced and norm-summed over the expert-data-parallel
   group (sum over that group, divided by the world size: the same average as
   `cluster.expert_parallel.reduce_gradients`). DeepSpeed turns its MoE paths
   on only when the module holds a `deepspeed.moe.layer.MoE`; our layers are
   not one (the model code never imports DeepSpeed), so the module handed to
   DeepSpeed is a wrapper that holds the model and one parameter-free
   `_ExpertGroups` marker. When DeepSpeed calls its
   `set_deepspeed_parallelism`, the marker registers the `ParallelDims`
   groups under DeepSpeed's group name instead of letting DeepSpeed create
   its own. The layouts are the same anyway (consecutive expert groups,
   strided expert-data-parallel groups), but reusing them saves communicators.
4. Skipped steps. A non-finite gradient norm is DeepSpeed's own overflow:
   ZeRO drops the gradients and leaves the weights and AdamW state alone. A
   non-finite loss with finite gradients (the worker decides from the
   all-reduced loss) goes down the same path: the engine makes ZeRO's overflow
   check report an overflow for that one step.
5. The shared-memory all-reduce. On the CPU accelerator DeepSpeed JIT-compiles
   a shared-memory op (`deepspeed_shm_comm`; 70 s on our 2-core machine, then
   cached in ~/.cache/torch_extensions) when it wraps the process group, and no
   environment variable turns that off. Only `inference_all_reduce` uses the
   op; training goes through torch.distributed (gloo). The engine marks the op
   incompatible in `deepspeed.ops.__compatible_ops__` before DeepSpeed wraps
   the process group, so nothing is compiled.
6. Optimizer state. `optimizer_state` returns the native engine's layout
   (`{param}::exp_avg`, `::exp_avg_sq`, `::step`, whole tensors; an expert
   shard's state on the ranks holding that shard), assembled from the ZeRO
   partitions with `deepspeed.utils.safe_get_full_optimizer_state`, so a
   checkpoint resumes under either engine. It is collective over each
   parameter's data-parallel group.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch
import torch.nn as nn
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import (groups, lazy_init_hp_params_optimizer_state, safe_get_full_optimizer_state,
                             safe_set_full_optimizer_state)

from moe import update_expert_bias
from moe.layer import MoELayer
from moe.plan import DEEPSPEED_REDUCE_BUCKET_ELEMENTS
from moe.router import discard_expert_counts

from cluster.expert_parallel import expert_bias_all_reduce, is_expert_param, load_full_state_dict
from cluster.optim import build_adamw, set_learning_rate
from cluster.parallel_dims import ParallelDims
from cluster.schema import TrainerConfig
from cluster.sharded_checkpoint import load_model

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


class DeepSpeedEngine:
    """ZeRO-1/2 data parallelism with expert-parallel groups, behind `TrainEngine`.

    Args:
        model: the model after `apply_expert_parallel` and `.to(device)`;
            trained in float32 (bfloat16 autocast stays the worker's business).
        dims: the built parallel degrees (`ParallelDims.build` has run).
        cfg: the `trainer` config as a dict: zero_stage, lr, beta1, beta2,
            weight_decay, grad_clip, grad_accum_steps, global_batch_size.
    Raises:
        ValueError naming `trainer.zero_stage` unless it is 1 or 2.
    """

    def __init__(self, model: nn.Module, dims: ParallelDims, cfg: TrainerConfig) -> None:
        if cfg.zero_stage not in (1, 2):
            raise ValueError(f"trainer.zero_stage must be 1 or 2 with trainer.engine=deepspeed, "
                             f"got {cfg.zero_stage}")
        self.model = model
        self.dims = dims
        self._names = {p: n for n, p in model.named_parameters()}
        self._bias_all_reduce = expert_bias_all_reduce(dims)
        _skip_shared_memory_op()
        num_experts = [m.num_experts for m in model.modules() if isinstance(m, MoELayer)]
        expert_groups = _ExpertGroups(dims, max(num_experts)) if any(map(is_expert_param, model.parameters())) else None
        self._engine, self._optimizer, _, _ = deepspeed.initialize(
            model=_DeepSpeedModule(model, expert_groups), optimizer=_adamw_with_expert_groups(model, cfg),
            config=_deepspeed_config(dims, cfg))
        self._group_index = {id(p): i for i, params in enumerate(self._optimizer.bit16_groups) for p in params}

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        self._optimizer.clear_backward_seen_flag()  # NOTE 2
        self._engine._backward_prologue()
        self._engine.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float, loss_is_finite: bool) -> tuple[float, bool]:
        set_learning_rate(self._optimizer, lr)
        if loss_is_finite:
            self._engine.step()
            norm = self._engine.get_global_grad_norm()
        else:
            norm = self._step_as_overflow()
        stepped = self._engine.was_step_applied()
        if stepped:
            update_expert_bias(self.model, all_reduce=self._bias_all_reduce)
        else:
            discard_expert_counts(self.model)
        value = float(norm) if norm is not None else float("nan")
        return (value if math.isfinite(value) and value >= 0 else float("nan")), stepped  # ZeRO's invalid norm is -1

    def optimizer_state(self, to_cpu: bool = True) -> dict[str, torch.Tensor]:
        """This rank's AdamW state in the native engine's layout (NOTE 6); collective. New tensors (ZeRO's
        partitions gathered), on the CPU or (`to_cpu=False`) on the parameters' device."""
        if not self._inner_state():
            return {}
        self._link_optimizer_state()
        steps = self._group_steps()
        out = {}
        for param, name in self._names.items():
            for key in ADAM_STATE_KEYS:
                out[f"{name}::{key}"] = safe_get_full_optimizer_state(param, key).detach().contiguous()
            out[f"{name}::step"] = steps[self._group_index[id(param)]].detach().clone()
        return {key: value.cpu() for key, value in out.items()} if to_cpu else out

    def end_inference(self) -> None:
        pass  # ZeRO 1/2 shard optimizer state and gradients only: the weights are whole on every rank

    def load_model_state(self, full_state: dict[str, torch.Tensor]) -> None:
        """The weights, then ZeRO's float32 master partition (a copy made at initialisation that
        `load_full_state_dict` does not reach; the next step would otherwise restore the old weights)."""
        load_full_state_dict(self.model, full_state, self.dims)
        self._optimizer.refresh_fp32_params()

    def load_sharded_model_state(self, directory: Path) -> None:
        """As `load_model_state`, from a sharded checkpoint's model/."""
        load_model(directory, self.model, self.dims)
        self._optimizer.refresh_fp32_params()

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restores `optimizer_state` (of either engine) after `load_model_state`."""
        if not tensors:
            return
        by_name = {name: param for param, name in self._names.items()}
        stored = {key.split("::", 1)[0] for key in tensors}
        if stored - set(by_name):
            raise ValueError(f"optimizer state has unknown parameters: {sorted(stored - set(by_name))[:5]}")
        missing = [f"{name}::{key}" for name in by_name for key in (*ADAM_STATE_KEYS, "step")
                   if f"{name}::{key}" not in tensors]
        if missing:
            raise ValueError(f"optimizer state lacks {len(missing)} tensors, e.g. {missing[:5]}")
        inner = self._optimizer.optimizer
        inner.state.clear()
        for params, flat in zip(self._optimizer.bit16_groups, self._optimizer.single_partition_of_fp32_groups):
            step = tensors[f"{self._names[params[0]]}::step"]
            inner.state[flat] = {"step": step.clone(), **{key: torch.zeros_like(flat) for key in ADAM_STATE_KEYS}}
        self._link_optimizer_state()
        for name, param in by_name.items():
            for key in ADAM_STATE_KEYS:
                value = tensors[f"{name}::{key}"]
                if value.shape != param.shape:
                    raise ValueError(f"optimizer state {name}::{key} has shape {tuple(value.shape)}, the parameter "
                                     f"{tuple(param.shape)} (saved with another parallel.ep?)")
                safe_set_full_optimizer_state(param, value.to(param.device), key)

    def _step_as_overflow(self) -> torch.Tensor:
        """DeepSpeed's step with its overflow check forced to fire (NOTE 4); returns the gradient norm."""
        optimizer = self._optimizer
        saved = optimizer.check_grad_overflow
        norm = []

        def report_overflow(partition_gradients: bool = True) -> None:
            norm.append(optimizer.scaled_global_norm())  # still logged, as the native engine does
            optimizer.overflow = True

        optimizer.check_grad_overflow = True
        optimizer.check_overflow = report_overflow
        try:
            self._engine.step()
        finally:
            optimizer.check_grad_overflow = saved
            del optimizer.check_overflow
        return norm[0]

    def _link_optimizer_state(self) -> None:
        """Points every parameter's ZeRO fragment at its slice of the AdamW state.

        ZeRO links them once, right after the first group's first AdamW step,
        when the later groups have no state yet; their fragments stay empty and
        `safe_get_full_optimizer_state` fails for them. Linking again is cheap
        (views).
        """
        for params, flat in zip(self._optimizer.bit16_groups, self._optimizer.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(params, flat, self._inner_state())

    def _inner_state(self) -> dict:
        return self._optimizer.optimizer.state

    def _group_steps(self) -> list[torch.Tensor]:
        state = self._inner_state()
        return [state[flat]["step"] for flat in self._optimizer.single_partition_of_fp32_groups]


class _ExpertGroups(MoE):
    """Makes DeepSpeed treat the model as MoE and hands it our groups (NOTE 3).

    DeepSpeed's test is `isinstance(module, deepspeed.moe.layer.MoE)`; this
    subclass skips `MoE.__init__` (which builds DeepSpeed's own gate and
    experts), holds no parameters and is never called.
    """

    def __init__(self, dims: ParallelDims, num_experts: int) -> None:
        nn.Module.__init__(self)
        self.dims = dims
        self.ep_size = dims.ep
        self.expert_group_name = dims.expert_group_name
        self.num_experts = num_experts
        self.num_local_experts = num_experts // dims.ep
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed before it builds the ZeRO optimizer: register the ParallelDims groups."""
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel is not the ParallelDims rank layout")
        dims, name = self.dims, self.expert_group_name
        if dims.ep_group is None or dims.edp_group is None:
            raise RuntimeError("call ParallelDims.build(rank) before building the DeepSpeed engine")
        groups._EXPERT_PARALLEL_GROUP[name] = dims.ep_group
        groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dims.ep_ranks(dims.rank)
        groups._EXPERT_DATA_PARALLEL_GROUP[name] = dims.edp_group
        groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dims.edp_ranks(dims.rank)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("_ExpertGroups only marks the model for DeepSpeed")


class _DeepSpeedModule(nn.Module):
    """What DeepSpeed wraps: the model (unchanged) beside the MoE marker (none for a dense model)."""

    def __init__(self, model: nn.Module, expert_groups: Optional[_ExpertGroups]) -> None:
        super().__init__()
        self.model = model
        self.expert_groups = expert_groups

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _adamw_with_expert_groups(model: nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    """`build_adamw`'s groups and hyperparameters, expert parameters split into DeepSpeed MoE groups."""
    reference = build_adamw(model, cfg)
    param_groups = [dict(group) for group in reference.param_groups]  # each names itself ("name")
    param_groups = split_params_into_different_moe_groups_for_optimizer(param_groups)
    param_groups = [group for group in param_groups if group["params"]]
    for group in param_groups:
        assert all(is_expert_param(p) for p in group["params"]) == group.get("moe", False)
    return torch.optim.AdamW(param_groups)  # every group carries all of build_adamw's hyperparameters


def _deepspeed_config(dims: ParallelDims, cfg: TrainerConfig) -> dict[str, Any]:
    accum = cfg.grad_accum_steps
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.global_batch_size // (dims.world_size * accum),
        "gradient_accumulation_steps": accum,
        "managed_gradient_accumulation": False,  # NOTE 1
        "gradient_clipping": cfg.grad_clip,
        # ZeRO-2 reduces each filled gradient bucket on a side stream while the backward goes on (issue 18, S10;
        # double buckets: moe/plan.py counts them). DeepSpeed 0.19 refuses the overlap at ZeRO-1 with
        # managed_gradient_accumulation off (NOTE 1).
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": cfg.zero_stage == 2,
                              "reduce_bucket_size": DEEPSPEED_REDUCE_BUCKET_ELEMENTS, "contiguous_gradients": True,
                              "reduce_scatter": True},
    }


def _skip_shared_memory_op() -> None:
    """NOTE 5; effective only before DeepSpeed first wraps the process group in this process."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
