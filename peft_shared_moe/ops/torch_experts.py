"""The torch experts path: base experts and shared-outer / per-expert LoRA in one pass, with autograd.

One function, `experts_forward`, holds the math of docs/MATH.md over token-expert pairs sorted by
expert. The per-expert matrix products go through a `GroupedLinear` so the same math runs on
torch's `grouped_mm` (fast, bf16/fp16/fp32) or on an exact per-expert loop (any dtype, float64
included). Shared factors are never expanded per expert or per pair:

- shared gate/up A: `A x` is computed once per token, then gathered to the token's pairs;
- shared down B: `B_down` is applied once per token, after the routing-weighted sum of the
  rank-r down activations (sum_k w_k B A_k h_k = B sum_k w_k A_k h_k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Protocol

import torch
import torch.nn.functional as F

from ..factors import EXPERT_FACTORS
from .experts_layout import ExpertsLayout, default_gate
from .quantized import QuantizedExpertWeights
from .routing import ExpertRouting, sort_pairs_by_expert


def is_shared(factor: torch.Tensor) -> bool:
    """A hidden-size factor stored once for all experts: dim 0 == 1 (the serving layout's rule)."""
    return factor.shape[0] == 1


@dataclass(frozen=True)
class ExpertLoraFactors:
    """One adapter's factors for one experts block, by factor name (`factors.EXPERT_FACTORS`).

    Shared factors have dim 0 == 1: w1/w3.lora_A `[1|E, r, H]`, w1/w3.lora_B `[E, I, r]`,
    w2.lora_A `[E, r, I]`, w2.lora_B `[1|E, H, r]`.
    """

    tensors: Mapping[str, torch.Tensor]
    scaling: float

    def __post_init__(self) -> None:
        if set(self.tensors) != set(EXPERT_FACTORS):
            raise ValueError(f"expert LoRA factors must be exactly {EXPERT_FACTORS}, got {sorted(self.tensors)}")

    def __getitem__(self, factor: str) -> torch.Tensor:
        return self.tensors[factor]

    def values(self) -> list[torch.Tensor]:
        return [self.tensors[f] for f in EXPERT_FACTORS]

    @property
    def shared_in(self) -> bool:
        return is_shared(self["w1.lora_A"])

    @property
    def shared_out(self) -> bool:
        return is_shared(self["w2.lora_B"])

    @property
    def dtype(self) -> torch.dtype:
        return self["w1.lora_B"].dtype

    def to(self, dtype: torch.dtype) -> "ExpertLoraFactors":
        """The same adapter in another dtype; a differentiable cast, gradients reach the originals."""
        return ExpertLoraFactors({f: t.to(dtype) for f, t in self.tensors.items()}, scaling=self.scaling)


class GroupedLinear(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        """(S, in) rows sorted by expert, weight (E, out, in) -> (S, out), each expert group times that expert's weight.T"""
        ...


def loop_grouped_linear(x: torch.Tensor, weight: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
    """Exact per-expert loop: any dtype and device, but one host sync and E small matmuls."""
    if isinstance(weight, QuantizedExpertWeights):  # dequantized one expert at a time
        return weight.grouped_linear(x, routing.group_ends.tolist())
    x = x.to(weight.dtype)
    ends = routing.group_ends.tolist()
    starts = [0] + ends[:-1]
    pieces = [x[s:e] @ weight[i].T for i, (s, e) in enumerate(zip(starts, ends)) if e > s]  # each (n_e, out)
    unrouted = x.shape[0] - (ends[-1] if ends else 0)  # pairs routed to other ranks' experts (the tail)
    if unrouted or not pieces:
        pieces.append(x.new_zeros(unrouted, weight.shape[1]))
    return torch.cat(pieces, dim=0)  # (S, out)


def grouped_mm_runs_on(t: torch.Tensor) -> bool:
    """torch's grouped_mm has a kernel for `t`'s dtype and device (sizes and alignment aside)."""
    if not hasattr(F, "grouped_mm") or t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return not (t.device.type == "cuda" and torch.cuda.get_device_capability(t.device) < (8, 0))


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not grouped_mm_runs_on(weight):
        return False
    # grouped_mm wants every row stride and base pointer on a 16-byte boundary.
    item = weight.element_size()
    return (
        (weight.shape[1] * item) % 16 == 0
        and (weight.shape[2] * item) % 16 == 0
        and weight.data_ptr() % 16 == 0
        and x.shape[0] > 0
    )


class _DenseGrad(torch.autograd.Function):
    """Identity forward; the backward hands on a contiguous gradient.

    grouped_mm's backward refuses a gradient whose last dim is strided, which is what a consumer
    that interleaves the output (GPT-OSS's g0, u0, g1, u1 gate/up columns) sends back.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_mm_linear(x: torch.Tensor, weight: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
    """torch's grouped GEMM over the expert groups; falls back to the loop where it cannot run."""
    if isinstance(weight, QuantizedExpertWeights) or not _grouped_mm_supported(x, weight):
        return loop_grouped_linear(x, weight, routing)
    # grouped_mm reads the (in, out) view of each expert's weight; its backward needs a dense input
    # and a dense output gradient.
    out = F.grouped_mm(x.to(weight.dtype).contiguous(), weight.transpose(-2, -1), offs=routing.group_ends)
    return _DenseGrad.apply(out) if torch.is_grad_enabled() and out.requires_grad else out


def _per_token_lora_input(hidden: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Shared A applied once per token: (T, H) @ (1, r, H)[0].T -> (T, r)."""
    return F.linear(hidden.to(A.dtype), A[0])


def experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Optional[Callable[[torch.Tensor], torch.Tensor]],
    lora: Optional[ExpertLoraFactors] = None,
    linear: GroupedLinear = grouped_mm_linear,
    *,
    layout: Optional[ExpertsLayout] = None,
    apply_gate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y_t = sum_k w_k (W_down + s B_down A_down)[e_k] gate((W_gu + s B A)[e_k] x_t + b_gu) + b_down.

    Computed in the block's own storage, so every layout is exact: `layout` (default: [gate; up]
    (E, 2I, H), down (E, H, I)) says whether the weights are transposed (read as their (out, in)
    views, no copy) and whether gate/up are interleaved (the LoRA gate/up delta is placed in the
    same column order as the base product), and `apply_gate` is the block's own gate on that
    (S, 2I) tensor (default act_fn(gate) * up). Biases (E, 2I) and (E, H) are added per pair
    before the gate and before the routing weight, as transformers' experts code does.
    Shapes: hidden (T, H), top_k_* (T, k) -> (T, H).
    """
    transposed = layout is not None and layout.transposed
    # GroupedLinear wants (E, out, in): a transposed block's (E, in, out) storage read as a view.
    gate_up_w = gate_up_proj.transpose(1, 2) if transposed else gate_up_proj  # (E, 2I, H)
    down_w = down_proj.transpose(1, 2) if transposed else down_proj  # (E, H, I)
    if apply_gate is None:
        apply_gate = default_gate(act_fn)
    num_experts = gate_up_w.shape[0]
    skips_foreign = layout is not None and layout.skips_foreign_experts
    routing = sort_pairs_by_expert(top_k_index, top_k_weights, num_experts, skips_foreign)
    base_dtype = gate_up_w.dtype
    if lora is not None and base_dtype in (torch.bfloat16, torch.float16):
        # float32 master factors, half-precision GEMMs: the LoRA products run at the base's speed
        # (grouped float32 GEMMs are several times slower on GPUs) and accumulate in float32.
        lora = lora.to(base_dtype)
    # Rows of pairs routed to other ranks' experts (expert parallel) are zeroed on the way into the
    # GEMMs, so their undefined gradients never reach a token, and on the way out, before the sum.
    x_pairs = routing.keep_routed(hidden_states[routing.token_of_pair])  # (S, H)
    expert_of_pair = None
    if gate_up_bias is not None or down_bias is not None:
        expert_of_pair = top_k_index.reshape(-1)[routing.pair_order].clamp(max=num_experts - 1)  # (S,)

    gate_up = linear(x_pairs, gate_up_w, routing)  # (S, 2I), the block's column order
    if gate_up_bias is not None:
        gate_up = gate_up + routing.keep_routed(gate_up_bias[expert_of_pair])
    if lora is not None:
        s = lora.scaling
        if lora.shared_in:
            # A x once per token for each shared A, then one gather to pairs. The two A's are not
            # concatenated first: a parameter's gradient would then be a slice of the concatenation's,
            # with other strides than the parameter (DDP's "grad strides do not match bucket view").
            a_tokens = torch.cat(
                [_per_token_lora_input(hidden_states, lora["w1.lora_A"]), _per_token_lora_input(hidden_states, lora["w3.lora_A"])],
                dim=-1,
            )  # (T, 2r)
            a_gate, a_up = routing.keep_routed(a_tokens[routing.token_of_pair]).chunk(2, dim=-1)  # (S, r) each
        else:
            a_gate = linear(x_pairs, lora["w1.lora_A"], routing)  # (S, r)
            a_up = linear(x_pairs, lora["w3.lora_A"], routing)  # (S, r)
        d_gate = linear(a_gate, lora["w1.lora_B"], routing)  # (S, I)
        d_up = linear(a_up, lora["w3.lora_B"], routing)  # (S, I)
        delta = layout.gate_up_columns(d_gate, d_up) if layout is not None else torch.cat([d_gate, d_up], -1)
        gate_up = gate_up + (s * delta).to(base_dtype)

    h = apply_gate(gate_up)  # (S, I)
    down = linear(h, down_w, routing)  # (S, H)
    if down_bias is not None:
        down = down + routing.keep_routed(down_bias[expert_of_pair])

    token_delta = None
    if lora is not None:
        a_down = linear(h, lora["w2.lora_A"], routing)  # (S, r)
        if lora.shared_out:
            # Routing-weighted sum of the rank-r activations per token, then B_down once per token.
            weighted = routing.keep_routed(a_down) * routing.weight_of_pair.unsqueeze(-1).to(a_down.dtype)  # (S, r)
            token_delta = F.linear(routing.to_tokens(weighted), lora["w2.lora_B"][0])  # (T, H)
        else:
            down = down + (s * linear(a_down, lora["w2.lora_B"], routing)).to(base_dtype)

    down = routing.keep_routed(down)
    out = routing.to_tokens(down * routing.weight_of_pair.unsqueeze(-1).to(down.dtype))  # (T, H)
    if token_delta is not None:
        out = out + (s * token_delta).to(out.dtype)
    return out.to(hidden_states.dtype)
