"""Data parallelism through torch's FSDP2 (`fully_shard`), composed with expert parallelism.

`apply_fsdp` shards a model that `cluster.expert_parallel.apply_expert_parallel`
has already cut into expert shards, in the layout torchtitan uses for MoE:

    parameters               sharded over                     gradient reduce-scatter
    non-expert (attention,   the world (every rank)           mean over the world
    routers, norms, embed)
    an expert shard          its expert-data-parallel group   sum over that group / world size
                             (the ranks holding the same      (see the NOTE in
                             experts, strided by ep)          `cluster.expert_parallel.reduce_gradients`)

Each transformer block is one FSDP unit (its parameters are all-gathered before
its forward and backward and reduce-scattered right after its backward, so
communication overlaps the next block's compute); each MoE layer's experts form
their own unit on the expert-data-parallel mesh; the root unit holds the
embeddings, the final norm and the output head (tied or not). Expert weights
are sharded on their hidden dimension, not on the expert dimension, so a rank
never holds an empty shard when there are fewer local experts than replicas.

After `apply_fsdp` every parameter is a DTensor. The helpers in
`cluster.expert_parallel` (full state dict, loading), `cluster.diagnostics`
(gradient and weight norms) and `cluster.optim` (optimizer state) accept both
kinds, so the checkpoint format does not change: one full single-process model
file, and each rank's own optimizer state.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from moe.layer import MoELayer
from moe.model import MoETransformer

from cluster.parallel_dims import ParallelDims


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a parameter, gradient or optimizer state sharded by FSDP)."""
    return isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def meshes(dims: ParallelDims, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    """The 1-D meshes over the world and over this rank's expert-data-parallel group, from the groups that
    `ParallelDims.build` made (no new communicators)."""
    if dims.world_group is None:
        raise RuntimeError("call ParallelDims.build(rank) before apply_fsdp")
    world = DeviceMesh.from_group(dims.world_group, device_type)
    edp = world if dims.ep == 1 else DeviceMesh.from_group(dims.edp_group, device_type)
    return world, edp


def apply_fsdp(model: MoETransformer, dims: ParallelDims, *, reshard_after_forward: bool = True,
               param_dtype: Optional[torch.dtype] = None) -> MoETransformer:
    """Shards `model` in place with FSDP2 (see the module docstring); collective over all ranks.

    Call after `apply_expert_parallel`, activation checkpointing, `.to(device)` and `compile_blocks`, and
    before building the optimizer (as torchtitan orders them). Every rank must hold the same weights (build
    the model with the same seed) or load them afterwards with `cluster.expert_parallel.load_full_state_dict`.

    Args:
        model: the expert-parallel model.
        dims: the built parallel degrees.
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3 memory) and
            gather them again in backward; False keeps them until backward (ZeRO-2, less communication).
        param_dtype: gather (and compute with) the parameters in this dtype, reduce gradients in float32, keep
            the float32 shards for the optimizer (FSDP2's MixedPrecisionPolicy; torchtitan's bf16 default):
            half the all-gather bytes under bf16 training (issue 18, S3). None: float32 throughout.
    Returns:
        model.
    """
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise RuntimeError("apply_fsdp was already applied to this model")
    device_type = next(model.parameters()).device.type
    world, edp = meshes(dims, device_type)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in model.layers:
        ffn = getattr(block, "ffn", None)
        if dims.ep > 1 and isinstance(ffn, MoELayer):
            # Expert gradients arrive summed over the expert-parallel group already; summed again over the
            # expert-data-parallel group they cover every rank once, so the mean is over the world size.
            fully_shard(ffn.experts, mesh=edp, reshard_after_forward=reshard_after_forward,
                        shard_placement_fn=_shard_hidden_dim, mp_policy=mp)
            ffn.experts.set_gradient_divide_factor(float(dims.world_size))
            if dims.dp > 1:
                # A sum, then the division: gloo has no PREMUL_SUM. Not on a one-rank mesh, where torch 2.13
                # (fsdp/_fully_shard/_fsdp_collectives.py, foreach_reduce) would divide twice.
                ffn.experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=world, reshard_after_forward=reshard_after_forward,
                    shard_placement_fn=_shard_hidden_dim, mp_policy=mp)
    # The root unit's parameters are needed again at once by the output head: keep them gathered.
    fully_shard(model, mesh=world, reshard_after_forward=False, mp_policy=mp)
    return model


# The experts' output is a view (moe.experts keeps its gradient contiguous through `view_as`). FSDP warns that
# an in-place op on it would skip its pre-backward hook; the MoE layer only reads it (the combine writes a new
# tensor), and tests/test_fsdp.py would fail on a skipped all-gather.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPGroupedExperts\) returned a view tensor")


def _shard_hidden_dim(param: nn.Parameter) -> Shard:
    """Stacked expert weights (E, D, F) are split on D; everything else on its first dimension."""
    return Shard(1) if param.dim() == 3 else Shard(0)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """With gradient accumulation: skip the reduce-scatter on all but the last micro-batch (the local
    gradients accumulate unsharded, and the last backward reduces their sum once)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def reshard(model: nn.Module) -> None:
    """Frees what a forward pass without backward (evaluation, diagnostics) left gathered: the root unit keeps
    its parameters after forward (they are needed again by the backward pass), so after inference the module
    would otherwise hold full plain tensors until the next backward. A no-op without FSDP."""
    if isinstance(model, FSDPModule):
        model.reshard()


def all_reduce_sharded_square_sums(sums: torch.Tensor) -> None:
    """Sums squared norms of sharded tensors over the world, in place: under FSDP (with or without expert
    parallelism) every element of every parameter lives on exactly one rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
