"""Token-expert pairs sorted by expert: the one routing structure every experts backend consumes.

Worked example, T = 3 tokens, top-k = 2, E = 4 experts::

    top_k_index = [[2, 0],      flat pair ids 0..5 -> experts [2, 0, 3, 2, 0, 1]
                   [3, 2],
                   [0, 1]]
    pair_order  = [1, 4, 5, 0, 3, 2]   (a stable sort of the flat expert ids)
    token_of_pair = pair_order // 2  = [0, 2, 2, 0, 1, 1]
    tokens_per_expert = [2, 1, 2, 1]
    group_ends  = [2, 3, 5, 6]         (the `offs` of torch's grouped_mm)

Row p of a "sorted" tensor belongs to token `token_of_pair[p]`; the rows of one expert are
contiguous and end at its `group_ends` entry. Everything here stays on the device: no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ExpertRouting:
    num_tokens: int
    top_k: int
    num_experts: int
    pair_order: torch.Tensor  # (S,) flat pair index (token * top_k + slot) of each sorted row
    token_of_pair: torch.Tensor  # (S,) token of each sorted row
    weight_of_pair: torch.Tensor  # (S,) routing weight of each sorted row
    tokens_per_expert: torch.Tensor  # (E,) int32
    group_ends: torch.Tensor  # (E,) int32, cumulative tokens_per_expert
    # (S, 1) bool, True for pairs routed to one of these experts; None when every pair is. Under expert
    # parallelism a route to another rank's expert arrives as index E: it sorts to the tail, outside
    # every group, and its rows must be masked (grouped GEMMs leave them unwritten).
    routed_here: Optional[torch.Tensor] = None

    def keep_routed(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        """Zero the rows of pairs routed elsewhere (their values are undefined), forward and backward."""
        if self.routed_here is None:
            return sorted_rows
        return sorted_rows.masked_fill(~self.routed_here, 0.0)

    def to_tokens(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        """Sum the rows of each token's pairs: (S, D) sorted by expert -> (T, D).

        A gather back to pair order and a sum over top-k, rather than `index_add_`, keeps the result
        deterministic on CUDA and accumulates in float32 inside the reduction.
        """
        in_pair_order = torch.empty_like(sorted_rows).index_copy_(0, self.pair_order, sorted_rows)  # (S, D)
        return in_pair_order.view(self.num_tokens, self.top_k, sorted_rows.shape[-1]).sum(dim=1)  # (T, D)


def sort_pairs_by_expert(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, skips_foreign_experts: bool = False
) -> ExpertRouting:
    """Group the (token, expert) pairs of a top-k routing by expert; with `skips_foreign_experts`,
    index `num_experts` means "another rank's expert" and joins no group."""
    if top_k_index.dim() != 2 or top_k_index.shape != top_k_weights.shape:
        raise ValueError(
            f"top_k_index and top_k_weights must both be (tokens, top_k); got {tuple(top_k_index.shape)} and "
            f"{tuple(top_k_weights.shape)}"
        )
    num_tokens, top_k = top_k_index.shape
    flat_experts = top_k_index.reshape(-1)  # (S,)
    sorted_experts, pair_order = torch.sort(flat_experts, stable=True)  # (S,)
    # One slot more than there are experts catches the foreign routes; it is dropped after counting.
    tokens_per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=top_k_index.device)
    tokens_per_expert.scatter_add_(0, flat_experts.long(), torch.ones_like(flat_experts, dtype=torch.int32))
    tokens_per_expert = tokens_per_expert[:num_experts]
    routed_here = (sorted_experts < num_experts).unsqueeze(-1) if skips_foreign_experts else None
    return ExpertRouting(
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
        pair_order=pair_order,
        token_of_pair=pair_order // top_k,
        weight_of_pair=top_k_weights.reshape(-1)[pair_order],
        tokens_per_expert=tokens_per_expert,
        group_ends=torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32),
        routed_here=routed_here,
    )
