"""Sharded training checkpoints (`trainer.checkpoint_format=sharded`): torch.distributed.checkpoint, in the background.

The full format gathers the whole model to rank 0 and writes it while every
rank waits: a 47B-parameter model does not fit one host's memory, and the
training stalls for the whole write. Here

    each rank writes only what it holds (its expert slices, its FSDP shards;
    a replicated tensor is written once, by one rank) into `model/`, a
    `torch.distributed.checkpoint` (DCP) directory whose index records every
    tensor's global shape and where each piece lies;
    and the training goes on while the files are written.

NOTE: what happens at a checkpoint step.
 1. `model_state` describes this rank's weights to DCP: a DTensor (or plain
    tensor) per entry, with the global single-process shape. Expert weights
    are local slices the model does not know to be sharded, so they are
    wrapped as DTensors on a (dp, ep) mesh: Shard(0) over ep (the expert
    slices), and over dp Replicate() or, under FSDP, Shard(1) (its shards of
    the hidden dimension, `cluster.fsdp`).
 2. Staging, the stall: the weights, this rank's optimizer tensors and RNG
    state are copied to CPU memory (DCP's `DefaultStager`). Only this blocks
    the training loop, plus waiting for the previous checkpoint if it is
    still being written.
 3. A background thread (at the lowest CPU priority) writes: DCP's collective save of the staged copy
    into `.tmp-step_N/model/`, then this rank's optimizer and RNG files, then
    `cluster.checkpointing.save_training_checkpoint`'s steps (digests of
    every file gathered to rank 0, train_state.json last, the rename, the
    pruning), all on a gloo process group of their own: collectives of the
    training thread and of the writer never share a communicator.
 4. The next checkpoint, and the end of training, wait for the write; an
    error in the writer is raised there, in the training loop.
Loading reads the index and copies into each rank's own parameters the parts
of the stored pieces that overlap them (`load_model`): any engine, ep and
number of workers resumes any other's checkpoint, and no rank reads more
than it holds. `moe.checkpoint.read_weights` reads it whole in one process
(export, serving, `trainer.init_from`).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from moe.checkpoint import CONFIG_NAME, SHARDED_WEIGHTS_DIR, metadata_reader, saved_names, write_model_config

from cluster.expert_parallel import expert_param_names
from cluster.fsdp import is_sharded, local_part
from cluster.parallel_dims import ParallelDims, all_gather_objects


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


def expert_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The (dp, ep) mesh of the expert weights, from the groups `ParallelDims.build` made (rank = d * ep + e)."""
    mesh = torch.arange(dims.world_size).view(dims.dp, dims.ep)
    return DeviceMesh.from_group([dims.edp_group, dims.ep_group], device_type, mesh=mesh,
                                 mesh_dim_names=("dp", "ep"))


def model_state(model: torch.nn.Module, dims: ParallelDims, mesh: Optional[DeviceMesh] = None
                ) -> dict[str, torch.Tensor]:
    """This rank's weights for DCP (see NOTE 1): the persistent state dict of `moe.checkpoint` (tied output head
    left out), each entry a view of the model's own storage with its global shape. `mesh`: `expert_mesh`'s,
    made once by the caller (built here when None)."""
    names = saved_names(model)
    experts = expert_param_names(model) if dims.ep > 1 else set()
    state = {}
    for name, tensor in model.state_dict().items():
        if name not in names:
            continue
        if name in experts:
            if mesh is None:
                mesh = expert_mesh(dims, local_part(tensor).device.type)
            shape = (tensor.shape[0] * dims.ep, *tensor.shape[1:])  # a DTensor's shape is global over its mesh
            placements = [Shard(1) if is_sharded(tensor) else Replicate(), Shard(0)]
            tensor = DTensor.from_local(local_part(tensor), mesh, placements, run_check=False,
                                        shape=torch.Size(shape), stride=_contiguous_stride(shape))
        state[name] = tensor
    return state


@torch.no_grad()
def load_model(directory: Path, model: torch.nn.Module, dims: ParallelDims) -> None:
    """Copies a sharded checkpoint's weights (`directory` = its model/) into this rank's parts of `model`, in
    place, whatever layout wrote them; collective over the default process group.

    Raises:
        RuntimeError (DCP's) naming a tensor the model has and the checkpoint lacks; ValueError naming a tensor
        whose global shape differs.
    """
    state = model_state(model, dims)
    reader = metadata_reader(directory)
    stored = reader.read_metadata().state_dict_metadata
    for name, tensor in state.items():
        if name in stored and tuple(getattr(stored[name], "size", ())) != tuple(tensor.shape):
            raise ValueError(f"{directory}: {name} has shape {tuple(stored[name].size)}, the model "
                             f"{tuple(tensor.shape)}")
    dcp.load(state, storage_reader=reader)


class ShardedCheckpointer:
    """Writes sharded checkpoints in a background thread (the NOTE above); one per worker, made on every rank
    (collective: it creates the writer's process group)."""

    def __init__(self, model: torch.nn.Module, dims: ParallelDims, device: torch.device) -> None:
        self.model = model
        self.dims = dims
        self._group = dist.new_group(backend="gloo")  # collective; the writer thread's only communicator
        self._mesh = expert_mesh(dims, device.type) if dims.ep > 1 else None
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self._stager = DefaultStager(StagingOptions(use_pinned_memory=device.type == "cuda",
                                                    use_shared_memory=False, use_async_staging=False,
                                                    use_non_blocking_copy=False))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer",
                                            initializer=_lowest_priority)
        self._pending: Optional[Future] = None

    def save(self, write: Callable[..., Path], optimizer_state: dict[str, torch.Tensor], **write_kwargs: Any
             ) -> float:
        """Stages this rank's weights, optimizer tensors (`engine.optimizer_state(to_cpu=False)`: copied here)
        and RNG state, and hands them to the writer thread,
        which calls `write(write_model=..., optimizer_state=..., rng_state=..., barrier=..., gather=...,
        **write_kwargs)` (`cluster.checkpointing.save_training_checkpoint`). Waits for the previous checkpoint
        first. Returns the seconds of that wait (more than a few milliseconds: checkpoints come faster than
        they are written; `trainer.checkpoint_every` is too small)."""
        start = time.perf_counter()
        # The stager keeps one CPU (pinned, on a GPU) buffer per tensor and copies into it at every save, so
        # the previous write must be over before the next copy.
        self.wait()
        waited = time.perf_counter() - start
        staged = self._stager.stage({"model": model_state(self.model, self.dims, self._mesh),
                                     "optimizer": optimizer_state})
        staged, optimizer_state = staged["model"], staged["optimizer"]
        rng_state = torch.get_rng_state()  # a new tensor
        group = self._group

        def write_model(directory: Path, rank: int, model_config: dict[str, Any]) -> list[str]:
            dcp.save(staged, checkpoint_id=str(directory / SHARDED_WEIGHTS_DIR), process_group=group)
            written = sorted(f"{SHARDED_WEIGHTS_DIR}/{p.name}" for p in (directory / SHARDED_WEIGHTS_DIR).iterdir()
                             if p.name.startswith(f"__{rank}_"))
            if rank == 0:
                write_model_config(model_config, directory)
                written += [f"{SHARDED_WEIGHTS_DIR}/.metadata", CONFIG_NAME]
            return written

        self._pending = self._executor.submit(
            write, write_model=write_model, optimizer_state=optimizer_state, rng_state=rng_state,
            barrier=lambda: dist.barrier(group=group), gather=lambda obj: all_gather_objects(obj, group),
            **write_kwargs)
        return waited

    def wait(self) -> Optional[Path]:
        """Blocks until the checkpoint being written (if any) is complete; returns its directory. Raises what
        the writer raised."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        self.wait()
        self._executor.shutdown(wait=True)
        self._stager.close()


def _lowest_priority() -> None:
    """The writer thread yields the CPU to the training threads (nice 19; Linux keeps a nice value per thread),
    whose cores it shares on CPU workers or with a busy data loader."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: the write still runs, at normal priority
        pass
