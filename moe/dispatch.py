"""Token permutation between the router and the experts.

Shape legend: T tokens, D hidden, K experts per token, A = T*K assignments,
N routed rows (assignments not dropped), E experts; for expert parallelism
R ranks of the expert-parallel group, L = E / R experts per rank, M rows
received by this rank.

A dispatcher turns (tokens, chosen expert ids) into rows sorted by expert plus
the row count of each expert, and turns expert outputs back into per-token
outputs weighted by the gate. `LocalDispatcher` keeps everything on one
device; `AllToAllDispatcher` (expert parallelism) has the same interface, so
the MoE layer swaps one for the other without other changes. It only needs a
process group, never Ray.

`combine` takes an optional `overlap` callable (the MoE layer passes its
shared experts) whose result is added to the output: `AllToAllDispatcher`
runs it while the expert outputs travel back over the network, and its
backward while their gradients travel out again, so the shared-expert
compute hides the combine all-to-all both ways (as DeepSeek-V3 and
torchtitan overlap them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from moe.router import count_per_expert


def host_ints(counts: torch.Tensor) -> list[int]:
    """`counts` as Python ints: the one device-to-host sync of an expert-parallel MoE layer (the all-to-all's
    split sizes must be on the host). One named place, so tests count it (tests/test_expert_parallel.py)."""
    return counts.tolist()


@dataclass
class DispatchState:
    """What `combine` needs to undo `dispatch`."""

    token_index_N: torch.Tensor  # source token of each sorted row
    assignment_index_N: torch.Tensor  # flat (token, slot) index of each sorted row
    num_tokens: int


class LocalDispatcher:
    """Sorts assignments by expert on the local device.

    Args:
        num_experts: E.
        dropless: no assignment is ever dropped (no capacity limit), which
            spares a device-to-host sync per layer.
    """

    def __init__(self, num_experts: int, dropless: bool = True) -> None:
        self.num_experts = num_experts
        self.dropless = dropless

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """Args:
            x_TD: token activations.
            topk_ids_TK: chosen experts, -1 for dropped assignments.
        Returns:
            (x_ND rows sorted by expert, tokens_per_expert (E,), state).
        """
        top_k = topk_ids_TK.shape[1]
        flat_ids_A = topk_ids_TK.reshape(-1)
        if self.dropless:
            assignment_index_N = torch.argsort(flat_ids_A, stable=True)
            tokens_per_expert = count_per_expert(flat_ids_A, self.num_experts)
        else:
            # Dropped assignments get id E: they sort last and are cut off. How many rows remain sizes the
            # output, so the capacity mode costs one device-to-host sync (dropless costs none).
            tokens_per_expert = count_per_expert(flat_ids_A, self.num_experts)
            flat_ids_A = torch.where(flat_ids_A < 0, self.num_experts, flat_ids_A)
            num_routed = int(tokens_per_expert.sum())
            assignment_index_N = torch.argsort(flat_ids_A, stable=True)[:num_routed]
        token_index_N = assignment_index_N // top_k
        x_ND = x_TD.index_select(0, token_index_N)
        return x_ND, tokens_per_expert, DispatchState(token_index_N, assignment_index_N, x_TD.shape[0])

    def combine(self, y_ND: torch.Tensor, topk_weights_TK: torch.Tensor, state: DispatchState,
                overlap: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """Weights each row by its gate and sums the rows of each token, plus `overlap()` when given.

        The gates stay in their own precision (float32: the router computes in it) and the top-k sum accumulates
        in it, as Megatron's unpermute does: under bf16 autocast the expert outputs are bf16, and casting the
        gates down and summing in bf16 would round twice more per token (issue 18, W3).
        """
        weights_N = topk_weights_TK.reshape(-1).index_select(0, state.assignment_index_N)
        dtype = torch.promote_types(y_ND.dtype, weights_N.dtype)
        weighted_ND = y_ND.to(dtype) * weights_N.unsqueeze(-1).to(dtype)
        out_TD = weighted_ND.new_zeros(state.num_tokens, y_ND.shape[-1]).index_add(0, state.token_index_N,
                                                                                  weighted_ND)
        return out_TD if overlap is None else out_TD + overlap()


@dataclass
class AllToAllDispatchState(DispatchState):
    """What `AllToAllDispatcher.combine` needs: the local sort plus the exchange layout."""

    send_splits: list[int]  # rows sent to each rank of the group (R,)
    recv_splits: list[int]  # rows received from each rank of the group (R,)
    regroup_index_M: torch.Tensor  # received row of each row sorted by local expert
    ungroup_index_M: torch.Tensor  # its inverse permutation


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all of rows whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, recv_splits: list[int], send_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:  # noqa: D102
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        out_MD = x_ND.new_empty((sum(recv_splits),) + tuple(x_ND.shape[1:]))
        dist.all_to_all_single(out_MD, x_ND.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=group)
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):  # noqa: D102
        grad_ND = _AllToAll.apply(grad_MD.contiguous(), ctx.send_splits, ctx.recv_splits, ctx.group)
        return grad_ND, None, None, None


class _InFlight:
    """The exchange pending between `_AllToAllStart` and `_AllToAllWait`, in the forward and in the backward
    (kept off the autograd graph)."""

    def __init__(self, recv_splits: list[int], send_splits: list[int], group: dist.ProcessGroup) -> None:
        self.recv_splits, self.send_splits, self.group = recv_splits, send_splits, group
        self.work: Optional[dist.Work] = None
        self.buffers: tuple[torch.Tensor, ...] = ()  # (sent, received) until the exchange is waited for

    def start(self, x: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
        """Starts the exchange (`reverse`: the backward's, splits swapped) and returns the buffer it fills."""
        output_splits, input_splits = ((self.send_splits, self.recv_splits) if reverse
                                       else (self.recv_splits, self.send_splits))
        sent = x.contiguous()
        received = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        self.work = dist.all_to_all_single(received, sent, output_split_sizes=output_splits,
                                           input_split_sizes=input_splits, group=self.group, async_op=True)
        self.buffers = (sent, received)
        return received

    def wait(self) -> torch.Tensor:
        self.work.wait()
        received = self.buffers[1]
        self.work, self.buffers = None, ()
        return received


class _AllToAllStart(torch.autograd.Function):
    """Starts the variable-size all-to-all and returns the buffer it is filling: nothing may read it before
    `_AllToAllWait`. In the backward the roles swap: `_AllToAllWait.backward` starts the reverse exchange and
    this backward waits for it, so whatever autograd runs between the two (the shared experts' backward) hides
    it."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, in_flight: _InFlight) -> torch.Tensor:  # noqa: D102
        ctx.in_flight = in_flight
        return in_flight.start(x_ND)

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):  # noqa: D102
        # grad_MD is what _AllToAllWait.backward passed on; its exchange is already under way.
        return ctx.in_flight.wait(), None


class _AllToAllWait(torch.autograd.Function):
    """Waits for the exchange `_AllToAllStart` began; its backward starts the reverse exchange."""

    @staticmethod
    def forward(ctx, out_MD: torch.Tensor, in_flight: _InFlight) -> torch.Tensor:  # noqa: D102
        ctx.in_flight = in_flight
        in_flight.wait()  # fills out_MD
        return out_MD.view_as(out_MD)

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):  # noqa: D102
        # Autograd runs ready nodes latest-created first: the shared experts' backward (created between the
        # two) runs next, while these gradients travel; _AllToAllStart.backward, created first, waits last.
        ctx.in_flight.start(grad_MD, reverse=True)
        return grad_MD, None


class AllToAllDispatcher:
    """Expert-parallel dispatch: each rank of `ep_group` holds E / R experts.

    Dropless: every routed assignment reaches its expert, however unbalanced.
    Assignments with id -1 (dropped by the capacity limit) are dropped before
    anything is sent.

    NOTE: the three steps of `dispatch` (reversed by `combine`):
    1. Sort this rank's assignments by global expert id, exactly as
       `LocalDispatcher` does (dropped ids sort last and are cut off). Because
       rank r holds experts [r*L, (r+1)*L), the sorted rows are already grouped
       by destination rank, so the rows for rank r are one contiguous block.
    2. Exchange the per-expert row counts with an all-to-all of E integers:
       rank r receives `recv_counts_RL[s, l]`, the number of rows rank s sends
       to its local expert l. Summing over l gives the split sizes of both
       directions, which the variable-size all-to-all needs on the host (the
       layer's one device-to-host sync).
    3. Exchange the rows (differentiable: the backward is the same exchange
       with the splits swapped). Rows arrive ordered by (source rank, local
       expert); a stable sort by local expert regroups them into the
       (local expert, source rank) order the grouped GEMM needs, with
       `tokens_per_local_expert = recv_counts_RL.sum(0)`.
    `combine` undoes 3 (inverse permutation, reverse all-to-all) so each rank
    gets back the outputs of its own rows in its step-1 order, then weights
    and sums them per token like `LocalDispatcher.combine`.

    Every rank of the group must call dispatch/combine (and backward) for
    every MoE layer in the same order, as with any collective.

    Args:
        num_experts: E, the global number of routed experts.
        ep_group: the expert-parallel process group (R ranks, R divides E).
    """

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup) -> None:
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"the expert-parallel group size ({self.ep_size}) must divide "
                             f"model.experts.num_experts ({num_experts})")
        self.num_local_experts = num_experts // self.ep_size
        self._local = LocalDispatcher(num_experts)  # its combine does the final weighting

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, AllToAllDispatchState]:
        """Args:
            x_TD: this rank's token activations.
            topk_ids_TK: chosen global expert ids, -1 for dropped assignments.
        Returns:
            (x_MD rows for this rank's local experts sorted by local expert,
            tokens_per_local_expert (L,), state).
        """
        num_ranks, num_local = self.ep_size, self.num_local_experts
        top_k = topk_ids_TK.shape[1]

        # 1. Sort by global expert; dropped assignments get id E and sort last. (A scatter-add count:
        # `bincount` would cost a device-to-host sync of its own on CUDA.)
        flat_ids_A = topk_ids_TK.reshape(-1)
        send_counts_E = count_per_expert(flat_ids_A, self.num_experts)
        flat_ids_A = torch.where(flat_ids_A < 0, self.num_experts, flat_ids_A)
        order_A = torch.argsort(flat_ids_A, stable=True)

        # 2. Exchange counts: block r of send_counts_E goes to rank r.
        recv_counts_E = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts_E, send_counts_E, group=self.ep_group)
        recv_counts_RL = recv_counts_E.view(num_ranks, num_local)
        splits = host_ints(torch.cat([send_counts_E.view(num_ranks, num_local).sum(1), recv_counts_RL.sum(1)]))
        send_splits, recv_splits = splits[:num_ranks], splits[num_ranks:]

        assignment_index_N = order_A[:sum(send_splits)]
        token_index_N = assignment_index_N // top_k
        x_ND = x_TD.index_select(0, token_index_N)
        if torch.is_autocast_enabled(x_TD.device.type):
            # The experts cast their input to the autocast dtype first thing (`GroupedExperts.forward`): cast
            # before the exchange instead, and the rows (and their gradients) cross the network in half the bytes.
            x_ND = x_ND.to(torch.get_autocast_dtype(x_TD.device.type))

        # 3. Exchange rows, then regroup from (source rank, local expert) to (local expert, source rank).
        x_MD = _AllToAll.apply(x_ND, recv_splits, send_splits, self.ep_group)
        local_ids = torch.arange(num_local, device=x_TD.device).repeat(num_ranks)
        local_id_M = torch.repeat_interleave(local_ids, recv_counts_RL.reshape(-1), output_size=sum(recv_splits))
        regroup_index_M = torch.argsort(local_id_M, stable=True)
        ungroup_index_M = torch.empty_like(regroup_index_M)
        ungroup_index_M[regroup_index_M] = torch.arange(regroup_index_M.numel(), device=x_TD.device)
        tokens_per_local_expert = recv_counts_RL.sum(0)
        state = AllToAllDispatchState(token_index_N, assignment_index_N, x_TD.shape[0], send_splits, recv_splits,
                                      regroup_index_M, ungroup_index_M)
        return x_MD.index_select(0, regroup_index_M), tokens_per_local_expert, state

    def combine(self, y_MD: torch.Tensor, topk_weights_TK: torch.Tensor, state: AllToAllDispatchState,
                overlap: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """Sends expert outputs back to their source ranks, weights each row by its gate and sums per token.
        `overlap()` runs while the outputs are in flight, and its backward while their gradients are; its
        result is added last."""
        y_MD = y_MD.index_select(0, state.ungroup_index_M)
        if overlap is None:
            y_ND = _AllToAll.apply(y_MD, state.send_splits, state.recv_splits, self.ep_group)
            return self._local.combine(y_ND, topk_weights_TK, state)
        in_flight = _InFlight(state.send_splits, state.recv_splits, self.ep_group)
        pending_ND = _AllToAllStart.apply(y_MD, in_flight)
        extra_TD = overlap()
        y_ND = _AllToAllWait.apply(pending_ND, in_flight)
        return self._local.combine(y_ND, topk_weights_TK, state) + extra_TD
