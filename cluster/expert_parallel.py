"""Expert parallelism applied to a single-device model from outside.

`apply_expert_parallel` keeps each MoE layer's share of the experts and swaps
its dispatcher for `moe.dispatch.AllToAllDispatcher`; the model code is
unchanged. The helpers here then reduce gradients, reduce the
auxiliary-loss-free bias counts, and convert between the sharded model and
the full single-process state dict (the checkpoint layout of `moe.checkpoint`).

Expert parameters are marked `is_expert = True` and, for DeepSpeed's MoE
support (`deepspeed.moe.utils.is_moe_param`), `allreduce = False` and
`group_name = "ep_size_{ep}"`. The rank layout of `ParallelDims` (expert
groups of consecutive ranks, expert-data-parallel groups strided by ep) is
DeepSpeed's default, so a DeepSpeed engine that creates its groups with
`deepspeed.utils.groups._create_expert_and_data_parallel(ep)` shards the same
way.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import distribute_tensor

from moe.checkpoint import saved_names
from moe.dispatch import AllToAllDispatcher
from moe.layer import MoELayer
from moe.model import MoETransformer

from cluster.fsdp import is_sharded
from cluster.parallel_dims import ParallelDims


def is_expert_param(param: torch.Tensor) -> bool:
    """True for parameters sharded by expert parallelism (marked by `apply_expert_parallel`)."""
    return getattr(param, "is_expert", False)


def apply_expert_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Shards every MoE layer's experts over the expert-parallel group, in place.

    Build the full model with the same seed on every rank first: rank r keeps
    experts `dims.expert_shard(E)` of the stacked weights, so the sharded
    model computes exactly what the single-process model computes. With
    ep = 1 nothing is sharded and the dispatcher stays local; the expert
    parameters are marked either way. Call before building the optimizer
    (the expert parameters are replaced); moving the model with `.to()`
    afterwards keeps the marks.

    Args:
        model: any module containing `MoELayer`s (e.g. a `MoETransformer`).
        dims: the parallel degrees; `dims.build()` must have run when ep > 1.
    Returns:
        model.
    Raises:
        ValueError naming `model.experts.num_experts` when ep does not divide it.
    """
    layers = [layer for _, layer in _moe_layers(model)]
    for layer in layers:
        dims.check_num_experts(layer.num_experts)
        if layer.experts.num_experts != layer.num_experts:
            raise RuntimeError("apply_expert_parallel was already applied to this model")
    if dims.ep > 1 and dims.ep_group is None:
        raise RuntimeError("call ParallelDims.build(rank) before apply_expert_parallel with ep > 1")
    for layer in layers:
        experts = layer.experts
        if dims.ep > 1:
            shard = dims.expert_shard(layer.num_experts)
            for name, param in list(experts.named_parameters(recurse=False)):
                setattr(experts, name, nn.Parameter(param.detach()[shard].clone(), requires_grad=param.requires_grad))
            experts.num_experts = shard.stop - shard.start
            layer.dispatcher = AllToAllDispatcher(layer.num_experts, dims.ep_group)
        for param in experts.parameters():
            param.is_expert = True
            param.allreduce = False  # deepspeed.moe.utils.is_moe_param
            param.group_name = dims.expert_group_name
    return model


def gather_full_state_dict(model: nn.Module, dims: ParallelDims, *, only_rank0: bool = False
                           ) -> dict[str, torch.Tensor]:
    """The single-process state dict of a sharded model; collective over all ranks.

    Returns detached contiguous CPU tensors in the layout of `moe.checkpoint`
    (persistent buffers included, tied output head left out), ready for
    `safetensors.torch.save_file` and loadable by `moe.load_checkpoint`. For a
    model on the CPU the replicated tensors share storage with the model: save
    (or copy) before the next step. One tensor at a time, in state-dict order:
    an FSDP-sharded parameter (`cluster.fsdp`) is gathered over its mesh, then
    an expert tensor over the expert-parallel group; so a rank never holds
    more than one full tensor beyond what it keeps.

    Args:
        only_rank0: keep the tensors on global rank 0 only (the checkpoint
            writer): every rank takes part in the FSDP gathers, the ranks of
            rank 0's expert-parallel group send it their expert shards (a
            gather, not an all-gather), and all but rank 0 return {}.
    """
    keep = not only_rank0 or dims.rank in (None, 0)
    # With only_rank0 an expert tensor is gathered to rank 0 alone, and only within its expert-parallel
    # group (global ranks 0..ep-1); the other groups hold the same shards and send nothing.
    sends_experts = not only_rank0 or dims.rank is None or 0 in dims.ep_ranks(dims.rank)
    names = saved_names(model) if isinstance(model, MoETransformer) else set(model.state_dict())
    expert_names = {name for name, _ in _expert_params(model)} if dims.ep > 1 else set()
    state = {}
    for name, tensor in model.state_dict().items():
        if name not in names:
            continue
        tensor = tensor.full_tensor() if is_sharded(tensor) else tensor
        if name in expert_names and sends_experts:
            shard = tensor.detach().contiguous()
            parts = [torch.empty_like(shard) for _ in range(dims.ep)] if keep else None
            if only_rank0:
                dist.gather(shard, parts, group=dims.ep_group, group_dst=0)
            else:
                dist.all_gather(parts, shard, group=dims.ep_group)
            tensor = torch.cat(parts) if keep else tensor
        if keep:
            state[name] = tensor.detach().contiguous().cpu()
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], dims: ParallelDims) -> None:
    """Loads a single-process state dict into a (possibly sharded) model: each
    rank copies its slice of the expert weights, and its FSDP shard of every
    sharded parameter. No communication.

    Raises:
        ValueError naming missing/unexpected tensors or a mismatched expert count.
    """
    expert_params = dict(_expert_params(model))
    params = dict(model.named_parameters())
    local = {}
    for name, value in state.items():
        if name in expert_params and dims.ep > 1:
            num_experts = expert_params[name].shape[0] * dims.ep
            if value.shape[0] != num_experts:
                raise ValueError(f"{name} holds {value.shape[0]} experts, the model has {num_experts}")
            value = value[dims.expert_shard(num_experts)]
        param = params.get(name)
        if param is not None and is_sharded(param):
            if value.shape != param.shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, the model has {tuple(param.shape)}")
            value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None)  # every rank read the same file: no communication
        local[name] = value
    missing, unexpected = model.load_state_dict(local, strict=False)
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def reduce_gradients(model: nn.Module, dims: ParallelDims, bucket_cap_mb: Optional[float] = None) -> None:
    """Averages gradients after each rank's backward of its own loss.

    The result equals one process's gradient of the global loss, the mean of
    the per-rank losses. Gradients that are None are taken as zero (and
    materialised), so that every rank reduces the same buffers.

    NOTE: why both kinds of parameters end up divided by the world size W.
    1. The global loss is L = (1/W) sum_r L_r, with L_r rank r's loss on its
       local batch; rank r runs backward on L_r alone.
    2. A non-expert parameter (attention, norms, embeddings, routers, shared
       experts) is replicated; rank r's copy only affects L_r, so its local
       gradient is dL_r/dθ and dL/dθ = (1/W) sum_r dL_r/dθ: all-reduce (sum)
       over the world, divide by W.
    3. An expert shard on rank r processes rows from every rank s of r's
       expert-parallel group and sends the outputs back into L_s. The
       all-to-all backward delivers dL_s/d(output rows) to r, so r's local
       gradient is already sum over s in its EP group of dL_s/dW (ep terms).
       The dp ranks holding the same shard (the expert-data-parallel group)
       cover the other EP groups: summing over that group gives the sum over
       all W ranks, which is divided by W, not by dp.
    4. With ep = 1 the expert-data-parallel group is the world, so expert
       gradients join the non-expert buckets.
    Each group is reduced in flat buckets (one all-reduce per bucket; with
    `bucket_cap_mb=None` one per group and dtype), not per parameter.

    Args:
        model: the (sharded) model after backward.
        dims: the built parallel degrees.
        bucket_cap_mb: optional cap on a bucket's size.
    """
    if dims.world_size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights once
    expert = [p for p in params if is_expert_param(p)] if dims.ep > 1 else []
    expert_ids = {id(p) for p in expert}
    replicated = [p for p in params if id(p) not in expert_ids]
    _all_reduce_grads(replicated, dims.world_group, dims.world_size, dims.world_size, bucket_cap_mb)
    _all_reduce_grads(expert, dims.edp_group, dims.dp, dims.world_size, bucket_cap_mb)


def expert_bias_all_reduce(dims: ParallelDims) -> Optional[Callable[[torch.Tensor], None]]:
    """The in-place sum over all ranks that `moe.update_expert_bias` needs.

    Routers are replicated and every rank routes its own tokens, so the global
    per-expert counts are the sum over the world group. Usage:
    `update_expert_bias(model, all_reduce=expert_bias_all_reduce(dims))`.
    Returns None on a single process.
    """
    if dims.world_size == 1:
        return None
    if dims.world_group is None:
        raise RuntimeError("call ParallelDims.build(rank) first")
    group = dims.world_group

    def all_reduce(counts: torch.Tensor) -> None:
        dist.all_reduce(counts, group=group)

    return all_reduce


def _moe_layers(model: nn.Module) -> Iterator[tuple[str, MoELayer]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, MoELayer))


def expert_param_names(model: nn.Module) -> set[str]:
    """The stacked expert weights (E, ...) of every MoE layer: what expert parallelism splits on dim 0."""
    return {name for name, _ in _expert_params(model)}


def _expert_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for layer_name, layer in _moe_layers(model):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for name, param in layer.experts.named_parameters(recurse=False):
            yield prefix + name, param


def _all_reduce_grads(params: list[nn.Parameter], group: Optional[dist.ProcessGroup], group_size: int,
                      divisor: int, bucket_cap_mb: Optional[float]) -> None:
    if not params:
        return
    grads = []
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    for bucket in _buckets(grads, bucket_cap_mb):
        flat = torch.cat([grad.reshape(-1) for grad in bucket])
        if group_size > 1:
            dist.all_reduce(flat, group=group)
        flat.div_(divisor)
        for grad, reduced in zip(bucket, flat.split([grad.numel() for grad in bucket])):
            grad.copy_(reduced.view_as(grad))


def _buckets(grads: list[torch.Tensor], bucket_cap_mb: Optional[float]) -> Iterator[list[torch.Tensor]]:
    """Groups tensors by (dtype, device), then splits each group at `bucket_cap_mb`."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for grad in grads:
        by_kind.setdefault((grad.dtype, grad.device), []).append(grad)
    cap = None if bucket_cap_mb is None else bucket_cap_mb * 2**20
    for group in by_kind.values():
        bucket, size = [], 0
        for grad in group:
            nbytes = grad.numel() * grad.element_size()
            if bucket and cap is not None and size + nbytes > cap:
                yield bucket
                bucket, size = [], 0
            bucket.append(grad)
            size += nbytes
        yield bucket
