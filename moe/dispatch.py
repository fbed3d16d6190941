"""Token permutation between the router and the experts.

Shape legend: T tokens, D hidden, K experts per token, A = T*K assignments,
N routed rows (assignments not dropped), E experts.

A dispatcher turns (tokens, chosen expert ids) into rows sorted by expert plus
the row count of each expert, and turns expert outputs back into per-token
outputs weighted by the gate. `LocalDispatcher` keeps everything on one
device; the expert-parallel dispatcher (all-to-all across ranks) has the same
interface, so the MoE layer swaps one for the other without other changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
            tokens_per_expert = torch.bincount(flat_ids_A, minlength=self.num_experts)
        else:
            # Dropped assignments get id E: they sort last and are cut off.
            flat_ids_A = torch.where(flat_ids_A < 0, self.num_experts, flat_ids_A)
            counts = torch.bincount(flat_ids_A, minlength=self.num_experts + 1)
            tokens_per_expert = counts[:self.num_experts]
            num_routed = flat_ids_A.numel() - int(counts[self.num_experts])
            assignment_index_N = torch.argsort(flat_ids_A, stable=True)[:num_routed]
        token_index_N = assignment_index_N // top_k
        x_ND = x_TD.index_select(0, token_index_N)
        return x_ND, tokens_per_expert, DispatchState(token_index_N, assignment_index_N, x_TD.shape[0])

    def combine(self, y_ND: torch.Tensor, topk_weights_TK: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Weights each row by its gate and sums the rows of each token."""
        weights_N = topk_weights_TK.reshape(-1).index_select(0, state.assignment_index_N)
        weighted_ND = y_ND * weights_N.unsqueeze(-1).to(y_ND.dtype)
        out_TD = y_ND.new_zeros(state.num_tokens, y_ND.shape[-1])
        return out_TD.index_add(0, state.token_index_N, weighted_ND)
