"""Triton training path: base experts plus LoRA forward and backward, the base frozen.

The same math as `train_experts.ExpertsLoraFunction` (the torch version of this backward, and the
reference the tests hold it to), on the inference kernels' grouped GEMM (`triton_experts.launch`)
plus two kernels of its own. One `BlockRouting` (pairs sorted by expert, padded to the block) serves
every pass, forward and backward, and is the only copy of the permutation that is kept.

Forward (shared-outer; per-expert factors add a small grouped pass each):
1. `a = x [A_gate; A_up]^T`, once per token (T, 2r)
2. gate_up GEMM: `pre = x W_gu^T + s a B_gu^T` -> kept (S, 2I); `h = SiLU(gate) * up` (S, I), not kept
3. down GEMM: `w h W_d^T` (S, H) and the fused shrink `w h A_d^T` (S, r), summed per token;
   `y = sum + s (sum_k w_k z_k) B_d^T` (B_d once per token); the rank-r sum is kept (T, r)

Backward, given dy (T, H):
1. `B_d^T dy` once per token (T, r)
2. `_gated_backward_kernel`: `g = dy W_d + s (B_d^T dy) A_d` per pair, and in its epilogue, from the
   kept pre-activation: the routing weight's gradient <h, g>, `d_pre` (S, 2I) and h (S, I)
3. `_expert_outer_kernel`, per expert, no atomics (deterministic): the gradients of B_gate, B_up
   (d_pre against a) and A_down (h against B_d^T dy, times s w per pair in the kernel); B_d's is one
   GEMM on the kept sum
4. `da = s [d_gate B_gate, d_up B_up]` (S, 2r); `dx = sum_k d_pre W_gu + (sum_k da) [A_gate; A_up]`;
   the shared A's gradient is one GEMM `(sum_k da)^T x` over the tokens

No factor is expanded per expert. The base weights get no gradient: a base that requires one is
refused (`triton_experts.triton_refusals`). Under torch.compile both halves are `torch.library`
custom ops with registered autograd, so a layer stays in one graph; eagerly the same two functions
run as an autograd.Function (the op dispatcher costs host time per call). Gradient checkpointing
recomputes the forward either way.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .block_routing import BlockRouting, align_pairs_to_blocks, max_blocks
from .kernel_configs import KernelConfig, TrainConfigs, train_configs
from .torch_experts import ExpertLoraFactors, is_shared
from .quantized import holds_quantized
from .triton_experts import (
    ExpertGemm, LoraExpansion, LoraShrink, _block_pairs, _expert_gemm, _like, _lora_dot, _stack, _tile_of_program,
    device_guard, dot_precision, launch,
)


@triton.jit
def _gated_backward_kernel(
    dy_ptr,  # (T, H) output gradient; row of pair p is p // X_ROW_DIV
    w_ptr,  # down weight read as (E, I, H)
    lora_in_ptr,  # (rows, R) B_d^T dy; row of pair p is p // LORA_ROW_DIV
    lora_b_ptr,  # A_down read as (E, I, R)
    pre_ptr,  # (S, 2I) [gate; up] kept by the forward
    pair_weight_ptr,  # (S,)
    d_pre_ptr,  # (S, 2I) out, strided like pre
    h_ptr,  # (S, I) out: SiLU(gate) * up
    w_grad_ptr,  # (S, cdiv(I, BLOCK_N)) out: <h, g> over this program's columns
    sorted_pair_ids_ptr,
    expert_of_block_ptr,
    num_padded_rows_ptr,
    N, K, R, num_pairs, scaling,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_lm, stride_lk,
    stride_be, stride_bn, stride_bk,
    stride_pm, stride_pn,
    stride_hm, stride_hn,
    stride_gm,
    X_ROW_DIV: tl.constexpr,
    LORA_ROW_DIV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_of_program(tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_rows_ptr):
        return
    expert, pair, row_ok = _block_pairs(pid_m, sorted_pair_ids_ptr, expert_of_block_ptr, num_pairs, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = dy_ptr + (pair // X_ROW_DIV)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    g, _unused = _expert_gemm(x_ptrs, w_ptrs, row_ok, n_ok, offs_k, K, stride_xk, stride_wk, 0,
                              False, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    g += scaling * _lora_dot(lora_in_ptr, pair // LORA_ROW_DIV, lora_b_ptr, expert, offs_n, row_ok, n_ok, R, stride_lm,
                             stride_lk, stride_be, stride_bn, stride_bk, BLOCK_R, DOT_PRECISION)

    # epilogue: the SiLU * up product recomputed from the kept pre-activation
    mask = row_ok[:, None] & n_ok[None, :]
    pre_ptrs = pre_ptr + pair[:, None] * stride_pm + offs_n[None, :] * stride_pn
    gate = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(pre_ptrs + N * stride_pn, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    silu = gate * sig
    h = silu * up
    tl.store(w_grad_ptr + pair * stride_gm + pid_n, tl.sum(h * g, axis=1), mask=row_ok)
    weight = tl.load(pair_weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    dh = g * weight[:, None]
    d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    d_pre_ptrs = d_pre_ptr + pair[:, None] * stride_pm + offs_n[None, :] * stride_pn
    tl.store(d_pre_ptrs, d_gate.to(d_pre_ptr.dtype.element_ty), mask=mask)
    tl.store(d_pre_ptrs + N * stride_pn, (dh * silu).to(d_pre_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + pair[:, None] * stride_hm + offs_n[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expert_outer_kernel(
    g_ptr,  # (rows, N); row of pair p is p // G_ROW_DIV
    x_ptr,  # (rows, R); row of pair p is p // X_ROW_DIV
    out_ptr,  # (E, N, R): out[e] = scaling * sum over e's pairs of g[p]^T x[p] (times w[p] with ROW_WEIGHT)
    row_weight_ptr,  # (S,) a weight per pair, read when ROW_WEIGHT
    sorted_pair_ids_ptr,
    block_start_ptr,  # (E + 1,) first block of each expert
    N, R, num_pairs, scaling,
    stride_gm, stride_gn,
    stride_xm, stride_xr,
    stride_oe, stride_on, stride_or,
    G_ROW_DIV: tl.constexpr,
    X_ROW_DIV: tl.constexpr,
    ROW_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program owns one expert's (BLOCK_N, R) tile and walks that expert's blocks: no atomics.
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    first = tl.load(block_start_ptr + expert)
    last = tl.load(block_start_ptr + expert + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_ok = offs_n < N
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for block in range(first, last):
        pair = tl.load(sorted_pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pair < num_pairs
        pair = tl.where(row_ok, pair, 0).to(tl.int64)
        g = tl.load(g_ptr + (pair // G_ROW_DIV)[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        x = tl.load(x_ptr + (pair // X_ROW_DIV)[:, None] * stride_xm + offs_r[None, :] * stride_xr,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        if ROW_WEIGHT:
            x = x * tl.load(row_weight_ptr + pair, mask=row_ok, other=0.0).to(x.dtype)[:, None]
        acc += tl.dot(tl.trans(g), x.to(g.dtype), input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + offs_n[:, None] * stride_on + offs_r[None, :] * stride_or
    tl.store(out_ptrs, (acc * scaling).to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & r_ok[None, :])


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(max(rank, 1)))


def expert_outer(g: torch.Tensor, x: torch.Tensor, out: torch.Tensor, routing: BlockRouting, block_start: torch.Tensor,
                 config: KernelConfig, *, g_row_div: int = 1, x_row_div: int = 1, scaling: float = 1.0,
                 row_weight: Optional[torch.Tensor] = None, precision: str = "tf32") -> torch.Tensor:
    """out[e] (N, R) = scaling * sum over the pairs p routed to e of g[p // g_row_div]^T x[p // x_row_div],
    each term times row_weight[p] when given."""
    num_experts, n, rank = out.shape
    if g.shape[1] != n or x.shape[1] != rank:
        raise ValueError(f"expert_outer shapes: g {tuple(g.shape)}, x {tuple(x.shape)}, out {tuple(out.shape)}")
    _expert_outer_kernel[(num_experts, triton.cdiv(n, config.block_n))](
        g, x, out, row_weight if row_weight is not None else out, routing.sorted_pair_ids, block_start, n, rank,
        routing.num_pairs, float(scaling),
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1), out.stride(2),
        G_ROW_DIV=g_row_div, X_ROW_DIV=x_row_div, ROW_WEIGHT=row_weight is not None, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_R=_block_r(rank), DOT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def _configs(gate_up: torch.Tensor) -> TrainConfigs:
    num_experts, two_inter, hidden = gate_up.shape
    return train_configs(num_experts, hidden, two_inter // 2, gate_up.device)


def _train_forward(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor,
    down: torch.Tensor, a_gate: torch.Tensor, a_up: torch.Tensor, b_gate: torch.Tensor, b_up: torch.Tensor,
    a_down: torch.Tensor, b_down: torch.Tensor, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor]:
    """(y, and what the backward keeps: pre (S, 2I), a (T|S, 2r), the weighted rank-r down activations
    (T|S, r), [A_gate; A_up] in the activation dtype, and the block routing's three tensors)."""
    with device_guard(x):
        num_tokens, top_k = top_k_index.shape
        num_experts, two_inter, hidden = gate_up.shape
        inter, rank, dtype = two_inter // 2, a_gate.shape[1], x.dtype
        cfg = _configs(gate_up)
        precision = dot_precision(dtype)
        routing = align_pairs_to_blocks(top_k_index, num_experts, cfg.block_m)
        num_pairs = routing.num_pairs
        pair_weights = top_k_weights.reshape(-1).contiguous()
        stacked_a = _stack([a_gate, a_up], dtype)  # (1|E, 2r, H)
        if is_shared(a_gate):
            a, a_row_div = x @ stacked_a[0].T, top_k  # (T, 2r): once per token
        else:
            a, a_row_div = x.new_empty(num_pairs, 2 * rank), 1
            launch(ExpertGemm(x, stacked_a, a, routing, cfg.gate_up, precision, x_row_div=top_k))
        h = x.new_empty(num_pairs, inter)
        pre = x.new_empty(num_pairs, two_inter)
        launch(ExpertGemm(x, gate_up, h, routing, cfg.gate_up, precision, x_row_div=top_k, gated=True,
                          expansion=LoraExpansion(a, b_gate, scaling, a_row_div, _like(b_up, b_gate)), store_pre=pre))
        if is_shared(b_down):
            out = x.new_empty(num_pairs, hidden + rank)  # the weighted shrink beside the down rows: one sum
            launch(ExpertGemm(h, down, out[:, :hidden], routing, cfg.down, precision,
                              shrink=LoraShrink(a_down, out[:, hidden:]), pair_weights=pair_weights))
            summed = out.view(num_tokens, top_k, hidden + rank).sum(dim=1)
            zw = summed[:, hidden:].contiguous()  # (T, r)
            y = torch.addmm(summed[:, :hidden], zw, b_down[0].to(dtype).T, alpha=scaling)
        else:
            z = x.new_empty(num_pairs, rank)
            launch(ExpertGemm(h, a_down, z, routing, cfg.down, precision))
            out = x.new_empty(num_pairs, hidden)
            launch(ExpertGemm(h, down, out, routing, cfg.down, precision, expansion=LoraExpansion(z, b_down, scaling),
                              pair_weights=pair_weights))
            y = out.view(num_tokens, top_k, hidden).sum(dim=1)
            zw = z * pair_weights.unsqueeze(1).to(dtype)  # (S, r)
    return y, pre, a, zw, stacked_a, routing.sorted_pair_ids, routing.expert_of_block, routing.num_padded_rows


# Under torch.compile the two halves are opaque ops (the schema comes from their annotations).
experts_lora_train_forward = torch.library.custom_op(
    "peft_shared_moe::experts_lora_train_forward", mutates_args=())(_train_forward)


@experts_lora_train_forward.register_fake
def _(x, top_k_index, top_k_weights, gate_up, down, a_gate, a_up, b_gate, b_up, a_down, b_down, scaling):
    num_tokens, top_k = top_k_index.shape
    num_experts, two_inter, hidden = gate_up.shape
    rank, num_pairs = a_gate.shape[1], num_tokens * top_k
    blocks = max_blocks(num_pairs, num_experts, _configs(gate_up).block_m)
    int32 = dict(dtype=torch.int32, device=x.device)
    return (
        x.new_empty(num_tokens, hidden),
        x.new_empty(num_pairs, two_inter),
        x.new_empty(num_tokens if is_shared(a_gate) else num_pairs, 2 * rank),
        x.new_empty(num_tokens if is_shared(b_down) else num_pairs, rank),
        x.new_empty(a_gate.shape[0], 2 * rank, a_gate.shape[2]),
        torch.empty(blocks * _configs(gate_up).block_m, **int32),
        torch.empty(blocks, **int32),
        torch.empty(1, **int32),
    )


def _train_backward(
    dy: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    a_gate: torch.Tensor, a_up: torch.Tensor, b_gate: torch.Tensor, b_up: torch.Tensor, a_down: torch.Tensor,
    b_down: torch.Tensor, pre: torch.Tensor, a: torch.Tensor, zw: torch.Tensor, stacked_a: torch.Tensor,
    sorted_pair_ids: torch.Tensor,
    expert_of_block: torch.Tensor, num_padded_rows: torch.Tensor, scaling: float, need_x: bool, need_w: bool,
) -> list[torch.Tensor]:
    """[dx, d top_k_weights, d a_gate, d a_up, d b_gate, d b_up, d a_down, d b_down]; an unneeded dx or
    d top_k_weights is an empty tensor (custom ops return tensors only)."""
    with device_guard(x):
        num_tokens, top_k = top_k_weights.shape
        num_experts, two_inter, hidden = gate_up.shape
        inter, rank, dtype, s = two_inter // 2, a_gate.shape[1], x.dtype, scaling
        cfg = _configs(gate_up)
        precision = dot_precision(dtype)
        routing = BlockRouting(num_tokens * top_k, sorted_pair_ids, expert_of_block, num_padded_rows)
        num_pairs = routing.num_pairs
        block_start = torch.searchsorted(
            expert_of_block, torch.arange(num_experts + 1, dtype=torch.int32, device=x.device)
        ).to(torch.int32)
        pair_weights = top_k_weights.reshape(-1).contiguous()
        dy = dy.to(dtype).contiguous()
        shared_in, shared_out = is_shared(a_gate), is_shared(b_down)
        a_row_div = top_k if shared_in else 1

        # B_d^T dy: once per token when B_d is shared
        if shared_out:
            bt_dy, bt_row_div = dy @ b_down[0].to(dtype), top_k  # (T, r)
        else:
            bt_dy, bt_row_div = x.new_empty(num_pairs, rank), 1
            launch(ExpertGemm(dy, b_down.transpose(1, 2), bt_dy, routing, cfg.down_backward, precision, x_row_div=top_k))

        # g = dy W_d + s (B_d^T dy) A_d, and from it d_pre, h and <h, g>
        d_pre = torch.empty_like(pre)
        h = x.new_empty(num_pairs, inter)
        k_cfg = cfg.down_backward
        n_tiles = triton.cdiv(inter, k_cfg.block_n)
        w_grad_parts = torch.empty(num_pairs, n_tiles, dtype=torch.float32, device=x.device)
        w_view, b_view = down.transpose(1, 2), a_down.transpose(1, 2)  # (E, I, H), (E, I, r)
        _gated_backward_kernel[(routing.max_blocks * n_tiles,)](
            dy, w_view, bt_dy, b_view, pre, pair_weights, d_pre, h, w_grad_parts,
            routing.sorted_pair_ids, routing.expert_of_block, routing.num_padded_rows,
            inter, hidden, rank, num_pairs, float(s),
            dy.stride(0), dy.stride(1), w_view.stride(0), w_view.stride(1), w_view.stride(2),
            bt_dy.stride(0), bt_dy.stride(1), b_view.stride(0), b_view.stride(1), b_view.stride(2),
            pre.stride(0), pre.stride(1), h.stride(0), h.stride(1), w_grad_parts.stride(0),
            X_ROW_DIV=top_k, LORA_ROW_DIV=bt_row_div, BLOCK_M=cfg.block_m, BLOCK_N=k_cfg.block_n,
            BLOCK_K=k_cfg.block_k, BLOCK_R=_block_r(rank), GROUP_M=k_cfg.group_m, DOT_PRECISION=precision,
            num_warps=k_cfg.num_warps, num_stages=k_cfg.num_stages,
        )
        grad_w = w_grad_parts.sum(dim=1).view(num_tokens, top_k).to(top_k_weights.dtype) if need_w else x.new_empty(0)

        outer = dict(routing=routing, block_start=block_start, config=cfg.outer, precision=precision)
        # A_down: h against s w (B_d^T dy) per pair, the weight applied in the kernel; written through
        # its transpose (E, I, r)
        grad_a_down = torch.empty(a_down.shape, dtype=a_down.dtype, device=x.device)
        expert_outer(h, bt_dy, grad_a_down.transpose(1, 2), x_row_div=bt_row_div, scaling=s, row_weight=pair_weights,
                     **outer)
        if shared_out:  # one GEMM on the kept routing-weighted sum
            grad_b_down = (s * (dy.t() @ zw)).unsqueeze(0).to(b_down.dtype)
        else:
            grad_b_down = torch.empty(b_down.shape, dtype=b_down.dtype, device=x.device)
            expert_outer(dy, zw, grad_b_down, g_row_div=top_k, scaling=s, **outer)
        d_gate, d_up = d_pre[:, :inter], d_pre[:, inter:]
        grad_b_gate = torch.empty(b_gate.shape, dtype=b_gate.dtype, device=x.device)
        grad_b_up = torch.empty(b_up.shape, dtype=b_up.dtype, device=x.device)
        expert_outer(d_gate, a[:, :rank], grad_b_gate, x_row_div=a_row_div, scaling=s, **outer)
        expert_outer(d_up, a[:, rank:], grad_b_up, x_row_div=a_row_div, scaling=s, **outer)

        # da = s [d_gate B_gate, d_up B_up] per pair
        da = x.new_empty(num_pairs, 2 * rank)
        launch(ExpertGemm(d_gate, b_gate.transpose(1, 2), da[:, :rank], routing, cfg.lora_backward, precision))
        launch(ExpertGemm(d_up, b_up.transpose(1, 2), da[:, rank:], routing, cfg.lora_backward, precision))
        da.mul_(s)
        dx = x.new_empty(0)
        if shared_in:
            da_tokens = da.view(num_tokens, top_k, 2 * rank).sum(dim=1)  # (T, 2r)
            grad_a = (da_tokens.t() @ x).unsqueeze(0)  # (1, 2r, H): one GEMM over the tokens
            if need_x:
                dx_pairs = x.new_empty(num_pairs, hidden)
                launch(ExpertGemm(d_pre, gate_up.transpose(1, 2), dx_pairs, routing, cfg.gate_up_backward, precision))
                dx = torch.addmm(dx_pairs.view(num_tokens, top_k, hidden).sum(dim=1), da_tokens, stacked_a[0])
        else:
            grad_a = torch.empty(num_experts, 2 * rank, hidden, dtype=torch.float32, device=x.device)
            expert_outer(x, da, grad_a.transpose(1, 2), g_row_div=top_k, **outer)
            if need_x:
                dx_pairs = x.new_empty(num_pairs, hidden)
                launch(ExpertGemm(d_pre, gate_up.transpose(1, 2), dx_pairs, routing, cfg.gate_up_backward, precision,
                                  expansion=LoraExpansion(da, stacked_a.transpose(1, 2))))
                dx = dx_pairs.view(num_tokens, top_k, hidden).sum(dim=1)
        # copies: a custom op's outputs may not share storage
        grad_a_gate = grad_a[:, :rank].to(a_gate.dtype, copy=True)
        grad_a_up = grad_a[:, rank:].to(a_up.dtype, copy=True)
    return [dx, grad_w, grad_a_gate, grad_a_up, grad_b_gate, grad_b_up, grad_a_down, grad_b_down]


experts_lora_train_backward = torch.library.custom_op(
    "peft_shared_moe::experts_lora_train_backward", mutates_args=())(_train_backward)


@experts_lora_train_backward.register_fake
def _(dy, x, top_k_weights, gate_up, down, a_gate, a_up, b_gate, b_up, a_down, b_down, pre, a, zw, stacked_a,
      sorted_pair_ids, expert_of_block, num_padded_rows, scaling, need_x, need_w):
    return [
        x.new_empty(x.shape if need_x else (0,)),
        top_k_weights.new_empty(top_k_weights.shape if need_w else (0,)),
        *(f.new_empty(f.shape) for f in (a_gate, a_up, b_gate, b_up, a_down, b_down)),
    ]


_FACTORS = ("w1.lora_A", "w3.lora_A", "w1.lora_B", "w3.lora_B", "w2.lora_A", "w2.lora_B")


def _setup_context(ctx, inputs, output) -> None:
    x, top_k_index, top_k_weights, gate_up, down, *factors, scaling = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero gradients built for the kept tensors
    ctx.save_for_backward(x, top_k_weights, gate_up, down, *factors, *output[1:])
    ctx.scaling = scaling


def _backward_with(backward_fn, ctx, dy):
    x, top_k_weights, gate_up, down, *rest = ctx.saved_tensors
    factors, kept = rest[:6], rest[6:]
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dx, grad_w, *grad_factors = backward_fn(dy, x, top_k_weights, gate_up, down, *factors, *kept, ctx.scaling, need_x, need_w)
    return (dx if need_x else None, None, grad_w if need_w else None, None, None, *grad_factors, None)


def _backward(ctx, dy, *_kept_grads):
    return _backward_with(experts_lora_train_backward, ctx, dy)


experts_lora_train_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerTraining(torch.autograd.Function):
    """The same two halves outside torch.compile, without the custom op dispatcher's per-call cost."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _train_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dy, *_kept_grads):
        return _backward_with(_train_backward, ctx, dy)


def triton_train_forward(
    hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, lora: ExpertLoraFactors,
) -> torch.Tensor:
    """The training kernels on one call, after `triton_refusals` found nothing against them. A base held
    quantized trains through `triton_quantized.QuantizedBaseTraining` (eager only: the refusals say so)."""
    inputs = (hidden_states.contiguous(), top_k_index, top_k_weights, gate_up_proj, down_proj,
              *(lora[f] for f in _FACTORS), float(lora.scaling))
    if holds_quantized((gate_up_proj, down_proj)):
        from .triton_quantized import QuantizedBaseTraining

        return QuantizedBaseTraining.apply(*inputs)[0]
    op = experts_lora_train_forward if torch.compiler.is_compiling() else _EagerTraining.apply
    return op(*inputs)[0]
