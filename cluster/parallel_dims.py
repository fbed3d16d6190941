"""The parallel degrees of a training job and the process groups they imply.

One object owns world size and expert-parallel degree, validates them and
builds the torch.distributed groups (as torchtitan's `ParallelDims`). The
model never sees this object: `cluster.expert_parallel` hands the MoE layers
only the expert-parallel process group.

Rank layout (ep = 2, world = 4):

    rank:                      0  1  2  3
    ep_rank (expert shard):    0  1  0  1
    dp_rank (replica):         0  0  1  1
    expert-parallel groups:    [0, 1], [2, 3]      (ep consecutive ranks)
    expert-data-parallel:      [0, 2], [1, 3]      (ranks holding the same shard)

Non-expert parameters are replicated on every rank: their data-parallel
group is the world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist


@dataclass
class ParallelDims:
    """World size and expert-parallel degree.

    Args:
        world_size: number of ranks (`cluster.num_workers`).
        ep: expert-parallel degree (`parallel.ep`): each MoE layer's experts
            are split over ep consecutive ranks. 1 replicates the experts.
        num_experts: optional routed experts per MoE layer
            (`model.experts.num_experts`), checked to be divisible by ep.
    Raises:
        ValueError naming the offending key.

    Attributes set by `build`: rank, ep_rank, dp_rank, ep_group, edp_group,
    world_group.
    """

    world_size: int
    ep: int = 1
    num_experts: Optional[int] = None
    rank: Optional[int] = field(default=None, init=False)
    ep_group: Optional[dist.ProcessGroup] = field(default=None, init=False, repr=False)
    edp_group: Optional[dist.ProcessGroup] = field(default=None, init=False, repr=False)
    world_group: Optional[dist.ProcessGroup] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not _is_positive_int(self.world_size):
            raise ValueError(f"cluster.num_workers must be a positive integer, got {self.world_size!r}")
        if not _is_positive_int(self.ep):
            raise ValueError(f"parallel.ep must be a positive integer, got {self.ep!r}")
        if self.world_size % self.ep:
            raise ValueError(f"parallel.ep ({self.ep}) must divide cluster.num_workers ({self.world_size})")
        if self.num_experts is not None:
            self.check_num_experts(self.num_experts)

    def check_num_experts(self, num_experts: int) -> None:
        """Raises ValueError unless ep divides `num_experts` (model.experts.num_experts)."""
        if not _is_positive_int(num_experts):
            raise ValueError(f"model.experts.num_experts must be a positive integer, got {num_experts!r}")
        if num_experts % self.ep:
            raise ValueError(f"parallel.ep ({self.ep}) must divide model.experts.num_experts ({num_experts})")

    @property
    def dp(self) -> int:
        """Expert-data-parallel degree: how many ranks hold each expert shard."""
        return self.world_size // self.ep

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def ep_rank(self) -> int:
        """Index of this rank's expert shard (its rank inside the expert-parallel group)."""
        return self._require_rank() % self.ep

    @property
    def dp_rank(self) -> int:
        """Index of this rank's replica (its rank inside the expert-data-parallel group)."""
        return self._require_rank() // self.ep

    @property
    def expert_group_name(self) -> str:
        """DeepSpeed's name for the expert group of this degree (`param.group_name`)."""
        return f"ep_size_{self.ep}"

    def ep_ranks(self, rank: int) -> list[int]:
        """Global ranks of the expert-parallel group of `rank`."""
        start = rank // self.ep * self.ep
        return list(range(start, start + self.ep))

    def edp_ranks(self, rank: int) -> list[int]:
        """Global ranks of the expert-data-parallel group of `rank` (same expert shard)."""
        return list(range(rank % self.ep, self.world_size, self.ep))

    def expert_shard(self, num_experts: int) -> slice:
        """The global expert ids this rank holds, as a slice of the stacked expert dim."""
        self.check_num_experts(num_experts)
        num_local = num_experts // self.ep
        return slice(self.ep_rank * num_local, (self.ep_rank + 1) * num_local)

    def build(self, rank: Optional[int] = None) -> "ParallelDims":
        """Creates the process groups; call on every rank after `init_process_group`.

        `new_group` is collective: every rank creates every group, in the same
        order. An expert-data-parallel group that spans all ranks reuses the
        world group (FSDP's); the expert-parallel group always gets its own
        communicator, even at ep == world: its all-to-alls then run on their
        own NCCL stream instead of queueing behind FSDP's all-gathers and
        reduce-scatters on the world's (issue 18, S9). Works with gloo and NCCL.

        Args:
            rank: this process's global rank; defaults to `dist.get_rank()`.
        Returns:
            self.
        """
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build needs torch.distributed.init_process_group to run first")
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(f"ParallelDims(world_size={self.world_size}) does not match the process group's "
                               f"world size {dist.get_world_size()}")
        self.rank = dist.get_rank() if rank is None else rank
        self.world_group = dist.group.WORLD
        self.ep_group = self._new_groups([self.ep_ranks(r) for r in range(0, self.world_size, self.ep)],
                                         own=self.ep > 1)
        self.edp_group = self._new_groups([self.edp_ranks(r) for r in range(self.ep)])
        return self

    def _new_groups(self, all_ranks: list[list[int]], own: bool = False) -> dist.ProcessGroup:
        if len(all_ranks) == 1 and not own:
            return dist.group.WORLD
        mine = None
        for ranks in all_ranks:
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = group
        assert mine is not None
        return mine

    def _require_rank(self) -> int:
        if self.rank is None:
            raise RuntimeError("call ParallelDims.build(rank) first")
        return self.rank


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def all_gather_objects(obj: Any, group: Optional[dist.ProcessGroup] = None) -> list[Any]:
    """One picklable object per rank of `group` (the world by default), in rank order (the `gather` of
    `cluster.checkpointing.save_training_checkpoint`). Without a process group, or with one rank, just [obj]."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
