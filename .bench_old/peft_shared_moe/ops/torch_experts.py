"""The torch experts path: base experts and shared-outer / per-expert LoRA in one pass, with autograd.

One function, `experts_forward`, holds the math of REFERENCE §3 over token-expert pairs sorted by
expert. The per-expert matrix products go through a `GroupedLinear` so the same math runs on
torch's `grouped_mm` (fast, bf16/fp16/fp32) or on an exact per-expert loop (any dtype, float64
included). Shared factors are never expanded per expert or per pair:

- shared gate/up A: `A x` is computed once per token, then gathered to the token's pairs;
- shared down B: `B_down` is applied once per token, after the routing-weighted sum of the
  rank-r down activations (sum_k w_k B A_k h_k = B sum_k w_k A_k h_k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F

from .routing import ExpertRouting, sort_pairs_by_expert


def is_shared(factor: torch.Tensor) -> bool:
    """A hidden-size factor stored once for all experts: dim 0 == 1 (the serving layout's rule)."""
    return factor.shape[0] == 1


@dataclass(frozen=True)
class ExpertLoraFactors:
    """One adapter's factors for one experts block, in the saved (serving) layout.

    Shared factors have dim 0 == 1: gate_A/up_A `[1|E, r, H]`, gate_B/up_B `[E, I, r]`,
    down_A `[E, r, I]`, down_B `[1|E, H, r]`.
    """

    gate_A: torch.Tensor
    gate_B: torch.Tensor
    up_A: torch.Tensor
    up_B: torch.Tensor
    down_A: torch.Tensor
    down_B: torch.Tensor
    scaling: float

    @property
    def shared_in(self) -> bool:
        return is_shared(self.gate_A)

    @property
    def shared_out(self) -> bool:
        return is_shared(self.down_B)

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_B.dtype

    def to(self, dtype: torch.dtype) -> "ExpertLoraFactors":
        """The same adapter in another dtype; a differentiable cast, gradients reach the originals."""
        cast = [t.to(dtype) for t in (self.gate_A, self.gate_B, self.up_A, self.up_B, self.down_A, self.down_B)]
        return ExpertLoraFactors(*cast, scaling=self.scaling)


class GroupedLinear(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        """(S, in) rows sorted by expert, weight (E, out, in) -> (S, out), each expert group times that expert's weight.T"""
        ...


def loop_grouped_linear(x: torch.Tensor, weight: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
    """Exact per-expert loop: any dtype and device, but one host sync and E small matmuls."""
    x = x.to(weight.dtype)
    ends = routing.group_ends.tolist()
    starts = [0] + ends[:-1]
    pieces = [x[s:e] @ weight[i].T for i, (s, e) in enumerate(zip(starts, ends)) if e > s]  # each (n_e, out)
    if not pieces:
        return x.new_zeros(x.shape[0], weight.shape[1])
    return torch.cat(pieces, dim=0)  # (S, out)


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if weight.device.type == "cuda" and torch.cuda.get_device_capability(weight.device) < (8, 0):
        return False
    # grouped_mm wants every row stride and base pointer on a 16-byte boundary.
    item = weight.element_size()
    return (
        (weight.shape[1] * item) % 16 == 0
        and (weight.shape[2] * item) % 16 == 0
        and weight.data_ptr() % 16 == 0
        and x.shape[0] > 0
    )


def grouped_mm_linear(x: torch.Tensor, weight: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
    """torch's grouped GEMM over the expert groups; falls back to the loop where it cannot run."""
    if not _grouped_mm_supported(x, weight):
        return loop_grouped_linear(x, weight, routing)
    # grouped_mm reads the (in, out) view of each expert's weight; its backward needs a dense input.
    return F.grouped_mm(x.to(weight.dtype).contiguous(), weight.transpose(-2, -1), offs=routing.group_ends)


def _per_token_lora_input(hidden: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Shared A applied once per token: (T, H) @ (1, r, H)[0].T -> (T, r)."""
    return F.linear(hidden.to(A.dtype), A[0])


def experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    lora: Optional[ExpertLoraFactors] = None,
    linear: GroupedLinear = grouped_mm_linear,
) -> torch.Tensor:
    """y_t = sum_k w_k (W_down + s B_down A_down)[e_k] (act(g_k) * u_k), g/u from (W + s B A)[e_k] x_t.

    Shapes: hidden (T, H), top_k_* (T, k), gate_up_proj (E, 2I, H), down_proj (E, H, I) -> (T, H).
    """
    num_experts, two_i, _ = gate_up_proj.shape
    routing = sort_pairs_by_expert(top_k_index, top_k_weights, num_experts)
    base_dtype = gate_up_proj.dtype
    if lora is not None and base_dtype in (torch.bfloat16, torch.float16):
        # float32 master factors, half-precision GEMMs: the LoRA products run at the base's speed
        # (grouped float32 GEMMs are several times slower on GPUs) and accumulate in float32.
        lora = lora.to(base_dtype)
    x_pairs = hidden_states[routing.token_of_pair]  # (S, H)

    gate_up = linear(x_pairs, gate_up_proj, routing)  # (S, 2I)
    if lora is not None:
        s = lora.scaling
        if lora.shared_in:
            # One (T, 2r) product for both shared A's, then gathered to pairs.
            shared_A = torch.cat([lora.gate_A, lora.up_A], dim=1)  # (1, 2r, H)
            a_gate, a_up = _per_token_lora_input(hidden_states, shared_A)[routing.token_of_pair].chunk(2, dim=-1)
        else:
            a_gate = linear(x_pairs, lora.gate_A, routing)  # (S, r)
            a_up = linear(x_pairs, lora.up_A, routing)  # (S, r)
        delta = torch.cat([linear(a_gate, lora.gate_B, routing), linear(a_up, lora.up_B, routing)], dim=-1)  # (S, 2I)
        gate_up = gate_up + (s * delta).to(base_dtype)

    gate, up = gate_up.split(two_i // 2, dim=-1)  # (S, I) each
    h = act_fn(gate) * up  # (S, I)
    down = linear(h, down_proj, routing)  # (S, H)

    token_delta = None
    if lora is not None:
        a_down = linear(h, lora.down_A, routing)  # (S, r)
        if lora.shared_out:
            # Routing-weighted sum of the rank-r activations per token, then B_down once per token.
            weighted = a_down * routing.weight_of_pair.unsqueeze(-1).to(a_down.dtype)  # (S, r)
            token_delta = F.linear(routing.to_tokens(weighted), lora.down_B[0])  # (T, H)
        else:
            down = down + (s * linear(a_down, lora.down_B, routing)).to(base_dtype)

    out = routing.to_tokens(down * routing.weight_of_pair.unsqueeze(-1).to(down.dtype))  # (T, H)
    if token_delta is not None:
        out = out + (s * token_delta).to(out.dtype)
    return out.to(hidden_states.dtype)
