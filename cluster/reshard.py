"""Optimizer state across parallel layouts: resuming a checkpoint under another trainer.engine or parallel.ep.

The model file of a checkpoint is the full single-process model, which any
layout loads. The optimizer state is not: each rank saved its own part
(`cluster.optim.optimizer_tensors`, `DeepSpeedEngine.optimizer_state`), in
the layout it was written with:

    writer engine         a non-expert tensor            an expert tensor (ep > 1: ep-rank e = rank % ep
                                                         holds experts [e * E/ep, (e + 1) * E/ep))
    native, deepspeed     whole, on every rank           its experts' slice, whole
    fsdp                  a torch.chunk of it on each    its experts' slice, chunked over the ranks holding
                          rank, on one dimension         that slice (e, e + ep, ...); with ep = 1, chunked
                                                         over every rank like the others

`reshard_optimizer_state` rebuilds each parameter's full single-process
tensor from the rank files (one tensor at a time, read lazily from
safetensors) and cuts this rank's part of it for the run's own layout, the
same way `cluster.expert_parallel.load_full_state_dict` cuts the weights.
The chunking dimension of an FSDP writer is read off the shapes (the one
dimension whose chunks add up to the full size), so the table above is the
only layout knowledge here. The writer's files are all read, so the number
of workers may change too (the data loader's state is global; see
`cluster.checkpointing.load_training_checkpoint` for the RNG state).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch.distributed.tensor import distribute_tensor

from cluster.expert_parallel import expert_param_names
from cluster.fsdp import is_sharded
from cluster.parallel_dims import ParallelDims


@dataclass(frozen=True)
class Layout:
    """How the optimizer state of a checkpoint is laid out over its ranks."""

    engine: str
    ep: int
    world_size: int

    @classmethod
    def of_checkpoint(cls, train_state: dict[str, Any], default: "Layout") -> "Layout":
        """The writer's layout from train_state.json. Checkpoints that predate the record of the engine were
        written before the fsdp engine existed (whole tensors, as native); a missing ep or world size counts
        as `default`'s."""
        return cls(train_state.get("engine", "native"), train_state.get("ep", default.ep),
                   train_state.get("world_size", default.world_size))

    @property
    def chunks_state(self) -> bool:
        return self.engine == "fsdp"

    def same_state_as(self, other: "Layout") -> bool:
        """Whether every rank holds the same optimizer tensors under both (native and deepspeed share one layout)."""
        return (self.chunks_state == other.chunks_state and self.ep == other.ep
                and self.world_size == other.world_size)


def _join_chunks(parts: list[torch.Tensor], shape: tuple[int, ...], key: str) -> torch.Tensor:
    """The tensor of `shape` that `parts` (in rank order) are torch.chunk pieces of, on one dimension."""
    if all(tuple(p.shape) == shape for p in parts):
        return parts[0]
    for dim in range(len(shape)):
        others = shape[:dim] + shape[dim + 1:]
        if (all(tuple(p.shape[:dim] + p.shape[dim + 1:]) == others for p in parts)
                and sum(p.shape[dim] for p in parts) == shape[dim]):
            return torch.cat(parts, dim)
    raise ValueError(f"optimizer state {key}: the ranks' parts {[tuple(p.shape) for p in parts]} do not make up "
                     f"the parameter's shape {shape}")


def full_optimizer_tensor(read: Callable[[int], torch.Tensor], key: str, shape: tuple[int, ...], expert: bool,
                          writer: Layout) -> torch.Tensor:
    """One parameter's optimizer tensor (`key` = "{param}::{field}", full single-process `shape`) from the
    writer's ranks; `read(rank)` returns that rank's stored tensor."""
    if key.endswith("::step"):
        return read(0)
    slices = writer.ep if expert else 1
    slice_shape = (shape[0] // slices, *shape[1:])
    pieces = []
    for e in range(slices):
        holders = list(range(e, writer.world_size, slices))  # the ranks holding slice e (all of them if 1)
        if writer.chunks_state:
            pieces.append(_join_chunks([read(r) for r in holders], slice_shape, key))
        else:
            piece = read(holders[0])
            if tuple(piece.shape) != slice_shape:
                raise ValueError(f"optimizer state {key} of rank {holders[0]} has shape {tuple(piece.shape)}, "
                                 f"expected {slice_shape} for {writer}")
            pieces.append(piece)
    return torch.cat(pieces) if slices > 1 else pieces[0]


def reshard_optimizer_state(checkpoint: Path, writer: Layout, model: torch.nn.Module, dims: ParallelDims
                            ) -> dict[str, torch.Tensor]:
    """This rank's optimizer tensors for `model` in its layout (`dims`, and FSDP if its parameters are
    sharded), from a checkpoint written in the `writer` layout. No communication: every rank reads the files.

    Raises:
        FileNotFoundError: a rank file of the writer is missing. ValueError: tensors that fit neither layout.
    """
    files = [checkpoint / f"optimizer_rank{r}.safetensors" for r in range(writer.world_size)]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} lacks {file.name} (written by {writer.world_size} "
                                    f"workers)")
    params = dict(model.named_parameters())
    experts = expert_param_names(model)
    num_experts = {name: params[name].shape[0] * dims.ep for name in experts}
    out = {}
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        for key in handles[0].keys():
            name = key.split("::", 1)[0]
            if name not in params:
                raise ValueError(f"optimizer state has unknown parameter {name!r}")
            param, expert = params[name], name in experts
            shape = ((num_experts[name], *param.shape[1:]) if expert else tuple(param.shape))
            tensor = full_optimizer_tensor(lambda r: handles[r].get_tensor(key), key, shape, expert, writer)
            if not key.endswith("::step"):
                if expert and dims.ep > 1:
                    tensor = tensor[dims.expert_shard(num_experts[name])]
                if is_sharded(param):
                    tensor = distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements,
                                               src_data_rank=None).to_local()  # every rank read the same files
            out[key] = tensor.contiguous()
    return out
