"""The training path: base experts plus LoRA as one autograd function with a hand-written backward.

autograd on `torch_experts.experts_forward` keeps every intermediate it meets: the gathered input
(S, H), the gate/up output (S, 2I), the activation (S, I), the down output (S, H), ... (S = tokens x
top-k). This function keeps the input (whose storage the caller holds anyway), the gate/up
pre-activation (S, 2I), the rank-r activations and the routing, and recomputes the rest:

- the SiLU * up product from the pre-activation;
- the routing weight's gradient without the down output, since
  d out / d w_k = <W_d h_k + s B_d A_d h_k, dy> = <h_k, g_k> with g_k = W_d^T dy + s A_d^T B_d^T dy,
  which the backward computes anyway (dh_k = w_k g_k).

Shared factors are never expanded: the shared gate/up A's gradient is one GEMM over the tokens
(its pair gradients summed per token first), the shared down B's one GEMM after the routing-weighted
sum, and B_d^T dy is computed once per token. The base weights get no gradient (they are frozen;
`train_refusals` says so otherwise). The math is docs/MATH.md's; the GEMMs are the torch path's
`GroupedLinear` (grouped_mm, or the exact loop for float64), so this runs on any device.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .experts_layout import ExpertsLayout
from .routing import ExpertRouting, sort_pairs_by_expert
from .torch_experts import (
    ExpertLoraFactors,
    GroupedLinear,
    grouped_mm_linear,
    grouped_mm_runs_on,
    is_shared,
    loop_grouped_linear,
)


def grouped_weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
    """Per expert e, grad_out[rows of e]^T @ inputs[rows of e]: (S, out), (S, in) -> (E, out, in)."""
    num_experts = routing.num_experts
    item = inputs.element_size()
    # grouped_mm wants every row stride on a 16-byte boundary (grad_out is read transposed: rows of S)
    aligned = all((n * item) % 16 == 0 for n in (inputs.shape[0], inputs.shape[1], grad_out.shape[1]))
    if grouped_mm_runs_on(inputs) and aligned and inputs.shape[0] > 0:
        return F.grouped_mm(grad_out.t(), inputs, offs=routing.group_ends)
    ends = routing.group_ends.tolist()
    starts = [0] + ends[:-1]
    out = grad_out.new_zeros(num_experts, grad_out.shape[1], inputs.shape[1])
    for e, (s, t) in enumerate(zip(starts, ends)):
        if t > s:
            out[e] = grad_out[s:t].t() @ inputs[s:t]
    return out


def _silu_and_grad(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sig = torch.sigmoid(gate)
    return gate * sig, sig * (1 + gate * (1 - sig))


class ExpertsLoraFunction(torch.autograd.Function):
    """out = sum_k w_k (W_d + s B_d A_d)[e_k] (silu(g) * u),  [g; u] = (W_gu + s [B_g A_g; B_u A_u])[e_k] x."""

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up, down, a_gate, a_up, b_gate, b_up, a_down, b_down,
                scaling: float, linear: GroupedLinear):
        num_experts, two_inter = gate_up.shape[0], gate_up.shape[1]
        routing = sort_pairs_by_expert(top_k_index, top_k_weights, num_experts)
        dtype = gate_up.dtype
        x = hidden.to(dtype)
        x_pairs = x[routing.token_of_pair]  # (S, H), not saved
        pre = linear(x_pairs, gate_up, routing)  # (S, 2I)
        shared_in, shared_out = is_shared(a_gate), is_shared(b_down)
        if shared_in:
            a_tokens = torch.cat([F.linear(x, a_gate[0]), F.linear(x, a_up[0])], dim=-1)  # (T, 2r)
            a_pairs = a_tokens[routing.token_of_pair]
        else:
            a_pairs = torch.cat([linear(x_pairs, a_gate, routing), linear(x_pairs, a_up, routing)], dim=-1)  # (S, 2r)
        rank = a_gate.shape[1]
        pre = pre + scaling * torch.cat(
            [linear(a_pairs[:, :rank], b_gate, routing), linear(a_pairs[:, rank:], b_up, routing)], dim=-1
        )
        gate, up = pre.split(two_inter // 2, dim=-1)
        h = F.silu(gate) * up  # (S, I), not saved
        w_pairs = routing.weight_of_pair.unsqueeze(-1).to(dtype)
        z = linear(h, a_down, routing)  # (S, r)
        down_rows = linear(h, down, routing)
        if shared_out:
            out = routing.to_tokens(down_rows * w_pairs)
            out = out + scaling * F.linear(routing.to_tokens(z * w_pairs), b_down[0])
        else:
            out = routing.to_tokens((down_rows + scaling * linear(z, b_down, routing)) * w_pairs)
        ctx.save_for_backward(x, top_k_weights, routing.pair_order, routing.group_ends, routing.tokens_per_expert,
                              pre, a_pairs, z, gate_up, down, a_gate, a_up, b_gate, b_up, a_down, b_down)
        ctx.scaling, ctx.linear = scaling, linear
        ctx.shape = (hidden.shape[0], top_k_index.shape[1], num_experts)
        ctx.hidden_dtype = hidden.dtype
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (x, top_k_weights, pair_order, group_ends, tokens_per_expert, pre, a_pairs, z, gate_up, down,
         a_gate, a_up, b_gate, b_up, a_down, b_down) = ctx.saved_tensors
        num_tokens, top_k, num_experts = ctx.shape
        routing = ExpertRouting(num_tokens, top_k, num_experts, pair_order, pair_order // top_k,
                                top_k_weights.reshape(-1)[pair_order], tokens_per_expert, group_ends)
        s, linear, dtype = ctx.scaling, ctx.linear, gate_up.dtype
        shared_in, shared_out = is_shared(a_gate), is_shared(b_down)
        rank = a_gate.shape[1]
        dy = grad_out.to(dtype)
        dy_pairs = dy[routing.token_of_pair]  # (S, H)
        w_pairs = routing.weight_of_pair.unsqueeze(-1).to(dtype)

        # g = W_d^T dy + s A_d^T B_d^T dy (per pair, unweighted); B_d^T dy once per token when shared.
        if shared_out:
            bt_dy = F.linear(dy, b_down[0].t())[routing.token_of_pair]  # (S, r)
        else:
            bt_dy = linear(dy_pairs, b_down.transpose(1, 2), routing)  # (S, r)
        g = linear(dy_pairs, down.transpose(1, 2), routing) + s * linear(bt_dy, a_down.transpose(1, 2), routing)
        gate, up = pre.split(pre.shape[1] // 2, dim=-1)
        silu, silu_grad = _silu_and_grad(gate)
        h = silu * up
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_w = None
        if need_w:  # d out / d w_k = <h_k, g_k>: no down output kept
            grad_w = torch.empty_like(routing.weight_of_pair, dtype=dtype).index_copy_(
                0, routing.pair_order, (h * g).sum(-1)
            ).view(num_tokens, top_k).to(top_k_weights.dtype)
        dh = g * w_pairs  # (S, I)

        # down factors
        dz = s * bt_dy * w_pairs  # d out / d z, (S, r)
        grad_a_down = grouped_weight_grad(dz, h, routing)
        if shared_out:
            grad_b_down = s * (dy.t() @ routing.to_tokens(z * w_pairs)).unsqueeze(0)  # (1, H, r)
        else:
            grad_b_down = s * grouped_weight_grad(dy_pairs * w_pairs, z, routing)

        # gate / up
        d_pre = torch.cat([dh * up * silu_grad, dh * silu], dim=-1)  # (S, 2I)
        d_gate, d_up = d_pre.split(d_pre.shape[1] // 2, dim=-1)
        grad_b_gate = s * grouped_weight_grad(d_gate, a_pairs[:, :rank], routing)
        grad_b_up = s * grouped_weight_grad(d_up, a_pairs[:, rank:], routing)
        da_pairs = s * torch.cat(
            [linear(d_gate, b_gate.transpose(1, 2), routing), linear(d_up, b_up.transpose(1, 2), routing)], dim=-1
        )  # (S, 2r)
        # the input's gradient (the largest GEMM of the backward) only where the input needs one
        dx_pairs = linear(d_pre, gate_up.transpose(1, 2), routing) if need_x else None  # (S, H)
        dx = None
        if shared_in:
            da_tokens = routing.to_tokens(da_pairs)  # (T, 2r)
            grad_a_gate = (da_tokens[:, :rank].t() @ x).unsqueeze(0)
            grad_a_up = (da_tokens[:, rank:].t() @ x).unsqueeze(0)
            if need_x:
                dx = routing.to_tokens(dx_pairs) + da_tokens[:, :rank] @ a_gate[0] + da_tokens[:, rank:] @ a_up[0]
        else:
            x_pairs = x[routing.token_of_pair]
            grad_a_gate = grouped_weight_grad(da_pairs[:, :rank], x_pairs, routing)
            grad_a_up = grouped_weight_grad(da_pairs[:, rank:], x_pairs, routing)
            if need_x:
                dx_pairs = dx_pairs + linear(da_pairs[:, :rank], a_gate.transpose(1, 2), routing)
                dx_pairs = dx_pairs + linear(da_pairs[:, rank:], a_up.transpose(1, 2), routing)
                dx = routing.to_tokens(dx_pairs)
        return (None if dx is None else dx.to(ctx.hidden_dtype), None, grad_w, None, None,
                grad_a_gate, grad_a_up, grad_b_gate, grad_b_up, grad_a_down, grad_b_down, None, None)


def train_refusals(layout: Optional[ExpertsLayout], gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                   lora: Optional[ExpertLoraFactors], act_fn, gate_up_bias, down_bias) -> list[str]:
    """Why `train_experts_forward` would not compute exactly what the module computes (empty: it will)."""
    from .experts_layout import _is_silu

    from .quantized import QuantizedExpertWeights

    reasons = []
    if lora is None:
        reasons.append("no adapter: the base alone is transformers' own experts code")
    if isinstance(gate_up_proj, QuantizedExpertWeights) or isinstance(down_proj, QuantizedExpertWeights):
        reasons.append("the base is held quantized; it reads bf16/fp16/fp32 weights (use backend='torch')")
    if layout is not None and not layout.fused_kernels_ok:
        reasons.append(f"it implements [gate; up] (E, 2I, H) weights without bias and a SiLU gate, not {layout}")
    if act_fn is not None and not _is_silu(act_fn):
        reasons.append(f"it implements the SiLU gate, not {act_fn!r}")
    if gate_up_bias is not None or down_bias is not None:
        reasons.append("it adds no expert biases")
    if gate_up_proj.requires_grad or down_proj.requires_grad:
        reasons.append("the base weights require grad; it computes no gradient for them (frozen base only)")
    return reasons


def train_experts_forward(
    hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: Optional[Callable[[torch.Tensor], torch.Tensor]],
    lora: Optional[ExpertLoraFactors] = None, *, layout: Optional[ExpertsLayout] = None,
    apply_gate: Optional[Callable] = None, gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The experts backend contract (ops/__init__.py) on `ExpertsLoraFunction`; raises where it would not be exact.
    `apply_gate` is not called: the layouts it accepts gate with SiLU, which the backward differentiates."""
    reasons = train_refusals(layout, gate_up_proj, down_proj, lora, act_fn, gate_up_bias, down_bias)
    if layout is None and apply_gate is not None:
        reasons.append("a gate function came without the block's layout, which says whether it is the SiLU gate")
    if reasons:
        raise ValueError("backend 'torch_fused' cannot run this call exactly: " + "; ".join(reasons)
                         + "; use backend='torch' or 'auto'")
    dtype = gate_up_proj.dtype
    if dtype in (torch.bfloat16, torch.float16):
        lora = lora.to(dtype)  # float32 masters, half-precision GEMMs (a differentiable cast), as the torch path
    linear = grouped_mm_linear if dtype != torch.float64 else loop_grouped_linear
    factors = [lora[f] for f in ("w1.lora_A", "w3.lora_A", "w1.lora_B", "w3.lora_B", "w2.lora_A", "w2.lora_B")]
    return ExpertsLoraFunction.apply(
        hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, *factors, lora.scaling, linear
    )
