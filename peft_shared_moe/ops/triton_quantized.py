"""Triton experts on a quantized base (NF4 or block-wise FP8, `quantized.py`).

Inference: the grouped GEMM of `triton_experts.py` with its weight tiles dequantized in registers
from the quantized storage, so a whole expert is never materialised in 16 bits. A tile element
(k, n) is the stored weight's (row n, column k) of the block's expert:
- NF4: the byte at flat index (n * in + k) / 2 of the expert, high nibble for even indices, its
  level times the absmax of block (n * in + k) / block;
- FP8: the e4m3 byte at (n, k), decoded with integer ops (so the interpreter runs it too), times the
  scale_inv of (n / block_n, k / block_k).
The value is cast to the activation dtype before the product, as the torch path dequantizes into the
compute dtype. The LoRA runs as on the bf16 base: shared A once per token, the factors' GEMMs on the
ordinary kernels (`launch`), shared B_down once per token after the routing-weighted sum.

Training (`QuantizedBaseTraining`): the bf16 training kernels (`triton_train.py`) on one layer's
weights dequantized into a transient buffer by `_dequantize_kernel` (the same tile decoding), made
again in the backward and freed after each half. Autograd keeps only the quantized storage, and at
most one layer's projections exist in 16 bits at a time (docs/DESIGN.md says why not in registers).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .block_routing import align_pairs_to_blocks
from .kernel_configs import kernel_config, shape_key
from .quantized import NF4_LEVELS, Fp8ExpertWeights, Nf4ExpertWeights, QuantizedExpertWeights
from .torch_experts import ExpertLoraFactors, is_shared
from .triton_experts import (
    ExpertGemm, _block_pairs, _lora_dot, _tile_of_program, dot_precision, launch, launch_fitting, pack_lora,
)
from .triton_train import _train_backward, _train_forward

NF4, FP8 = 1, 2  # SCHEME values


@functools.lru_cache(maxsize=None)
def _levels(device: torch.device) -> torch.Tensor:
    """The NF4 levels on `device`, made once: no host-to-device copy per call (CUDA graph capture)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@triton.jit
def _dequantized_tile(q_ptr, scale_ptr, levels_ptr, expert, rows, cols, mask, OUT, IN,
                      SCHEME: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK_N: tl.constexpr, QBLOCK_K: tl.constexpr):
    """(BK, BN) float32 weights of stored rows `rows` (BN,) and columns `cols` (BK,) of `expert`."""
    r = rows[None, :].to(tl.int64)
    c = cols[:, None].to(tl.int64)
    expert = expert.to(tl.int64)  # E * OUT * IN passes 2^31 on the largest models
    if SCHEME == 1:
        flat = r * IN + c
        byte = tl.load(q_ptr + expert * (OUT * IN // 2) + flat // 2, mask=mask, other=0).to(tl.int32)
        index = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        level = tl.load(levels_ptr + index)
        absmax = tl.load(scale_ptr + expert * (OUT * IN // QBLOCK) + flat // QBLOCK, mask=mask, other=0.0)
        return level * absmax
    else:
        byte = tl.load(q_ptr + expert * OUT * IN + r * IN + c, mask=mask, other=0).to(tl.int32)
        exponent = (byte >> 3) & 15
        mantissa = (byte & 7).to(tl.float32) / 8.0
        magnitude = tl.where(exponent == 0, mantissa * 0.015625,  # subnormal: m / 8 * 2^-6
                             (1.0 + mantissa) * tl.exp2((exponent - 7).to(tl.float32)))
        value = tl.where((byte & 128) != 0, -magnitude, magnitude)
        value = tl.where((byte & 127) == 127, float("nan"), value)  # e4m3fn's only NaN codes, 0x7F / 0xFF
        scale_cols = IN // QBLOCK_K
        scale = tl.load(scale_ptr + expert * (OUT // QBLOCK_N) * scale_cols + (r // QBLOCK_N) * scale_cols
                        + c // QBLOCK_K, mask=mask, other=0.0)
        return value * scale


@triton.jit
def _quantized_grouped_gemm_kernel(
    x_ptr,  # input rows; row of pair p is p // X_ROW_DIV
    q_ptr,  # NF4: (E, OUT * IN / 2) uint8; FP8: (E, OUT, IN) e4m3 bytes
    scale_ptr,  # NF4: (E, OUT * IN / QBLOCK) absmax; FP8: (E, OUT / QBLOCK_N, IN / QBLOCK_K) scale_inv
    levels_ptr,  # (16,) NF4 levels
    out_ptr,  # (S, N)
    lora_in_ptr,  # (rows, R or 2R)
    lora_b_ptr,  # (E, N, R), the gate half's when GATED
    lora_b_up_ptr,  # (E, N, R), strided like lora_b
    pair_weight_ptr,
    sorted_pair_ids_ptr,
    expert_of_block_ptr,
    num_padded_rows_ptr,
    N,  # output columns (I for the gated kernel, whose weight has 2I rows)
    K,  # = IN
    OUT,  # the stored weight's rows (2I gated, else N)
    R,
    num_pairs,
    scaling,
    stride_xm, stride_om, stride_lm,
    stride_be, stride_bn, stride_bk,
    SCHEME: tl.constexpr,
    QBLOCK: tl.constexpr,
    QBLOCK_N: tl.constexpr,
    QBLOCK_K: tl.constexpr,
    X_ROW_DIV: tl.constexpr,
    LORA_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    HAS_EXPAND: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
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
    x_ptrs = x_ptr + (pair // X_ROW_DIV)[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        k_ok = cols < K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        mask = k_ok[:, None] & n_ok[None, :]
        b = _dequantized_tile(q_ptr, scale_ptr, levels_ptr, expert, offs_n, cols, mask, OUT, K,
                              SCHEME, QBLOCK, QBLOCK_N, QBLOCK_K)
        acc += tl.dot(a, b.to(a.dtype), input_precision=DOT_PRECISION)
        if GATED:
            b_up = _dequantized_tile(q_ptr, scale_ptr, levels_ptr, expert, offs_n + N, cols, mask, OUT, K,
                                     SCHEME, QBLOCK, QBLOCK_N, QBLOCK_K)
            acc_up += tl.dot(a, b_up.to(a.dtype), input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
    if HAS_EXPAND:
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        l_ptrs = lora_in_ptr + (pair // LORA_ROW_DIV)[:, None] * stride_lm + offs_r[None, :]
        b_ptrs = lora_b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_bk
        acc += scaling * _lora_dot(l_ptrs, b_ptrs, row_ok, r_ok, n_ok, DOT_PRECISION)
        if GATED:
            b_up_ptrs = lora_b_up_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_bk
            acc_up += scaling * _lora_dot(l_ptrs + R, b_up_ptrs, row_ok, r_ok, n_ok, DOT_PRECISION)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # SiLU(gate) * up
    if MUL_WEIGHT:
        acc = acc * tl.load(pair_weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pair[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequantize_kernel(q_ptr, scale_ptr, levels_ptr, out_ptr, OUT, IN, SCHEME: tl.constexpr, QBLOCK: tl.constexpr,
                       QBLOCK_N: tl.constexpr, QBLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_N, BLOCK_K) tile of one expert's weight, dequantized into out (E, OUT, IN)."""
    expert = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (cols[:, None] < IN) & (rows[None, :] < OUT)
    tile = _dequantized_tile(q_ptr, scale_ptr, levels_ptr, expert, rows, cols, mask, OUT, IN,
                             SCHEME, QBLOCK, QBLOCK_N, QBLOCK_K)  # (BK, BN)
    out = out_ptr + expert.to(tl.int64) * OUT * IN + rows[None, :].to(tl.int64) * IN + cols[:, None]
    tl.store(out, tile.to(out_ptr.dtype.element_ty), mask=mask)


def _storage(weight: QuantizedExpertWeights) -> tuple[int, torch.Tensor, torch.Tensor, int, tuple[int, int]]:
    """(scheme, values, scales, NF4 block, FP8 (block_n, block_k)) as the kernels read them, dense."""
    if isinstance(weight, Nf4ExpertWeights):
        scheme, q, scale, qblock, qblock_nk = NF4, weight.packed, weight.absmax, weight.block, (1, 1)
    elif isinstance(weight, Fp8ExpertWeights):
        scheme, q, scale, qblock, qblock_nk = FP8, weight.weight.view(torch.uint8), weight.scale_inv, 1, weight.block
    else:
        raise TypeError(f"no kernel reads {type(weight).__name__}")
    return scheme, q.contiguous(), scale.contiguous(), qblock, qblock_nk  # no copy when already dense


def dequantized(weight: QuantizedExpertWeights, dtype: torch.dtype) -> torch.Tensor:
    """The whole (E, out, in) weight in `dtype`, decoded as the GEMM kernels decode a tile: the
    training path's transient buffer."""
    scheme, q, scale, qblock, (qblock_n, qblock_k) = _storage(weight)
    num_experts, rows, cols = weight.shape
    out = torch.empty(weight.shape, dtype=dtype, device=q.device)
    grid = (triton.cdiv(rows, 64), triton.cdiv(cols, 64), num_experts)
    _dequantize_kernel[grid](q, scale, _levels(q.device), out, rows, cols, SCHEME=scheme, QBLOCK=qblock,
                             QBLOCK_N=qblock_n, QBLOCK_K=qblock_k, BLOCK_N=64, BLOCK_K=64)
    return out


class QuantizedBaseTraining(torch.autograd.Function):
    """`triton_train`'s forward and backward with the base dequantized per call; the context keeps the
    quantized modules, never a dequantized weight (gradient checkpointing recomputes it like the rest)."""

    @staticmethod
    def forward(ctx, gate_up: QuantizedExpertWeights, down: QuantizedExpertWeights, x, top_k_index, top_k_weights,
                *factors_and_scaling):
        *factors, scaling = factors_and_scaling
        output = _train_forward(x, top_k_index, top_k_weights, dequantized(gate_up, x.dtype),
                                dequantized(down, x.dtype), *factors, scaling)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, top_k_weights, *factors, *output[1:])
        ctx.quantized, ctx.scaling = (gate_up, down), scaling
        return output

    @staticmethod
    def backward(ctx, dy, *_kept_grads):
        x, top_k_weights, *rest = ctx.saved_tensors
        factors, kept = rest[:6], rest[6:]
        need_x, need_w = ctx.needs_input_grad[2], ctx.needs_input_grad[4]
        dense = [dequantized(w, x.dtype) for w in ctx.quantized]
        dx, grad_w, *grad_factors = _train_backward(dy, x, top_k_weights, *dense, *factors, *kept, ctx.scaling,
                                                    need_x, need_w)
        return (None, None, dx if need_x else None, None, grad_w if need_w else None, *grad_factors, None)


def _quantized_gemm(x, weight: QuantizedExpertWeights, out, routing, config, precision, *, x_row_div=1, gated=False,
                    lora_in=None, lora_b=None, lora_b_up=None, lora_row_div=1, scaling=0.0, pair_weights=None) -> None:
    num_experts, rows, k = weight.shape
    n = rows // 2 if gated else rows
    scheme, q, scale, qblock, qblock_nk = _storage(weight)
    levels = _levels(x.device)
    has_expand = lora_in is not None
    lora_in = lora_in if has_expand else out
    lora_b = lora_b if has_expand else scale.view(1, 1, -1)
    lora_b_up = lora_b_up if lora_b_up is not None else lora_b
    rank = lora_b.shape[-1] if has_expand else 0
    block_r = max(16, triton.next_power_of_2(max(rank, 1)))
    grid = (routing.max_blocks * triton.cdiv(n, config.block_n),)
    launch_fitting(
        _quantized_grouped_gemm_kernel, grid, (scheme, gated, has_expand, block_r, config, precision),
        config.num_stages,
        x, q, scale, levels, out, lora_in, lora_b, lora_b_up, pair_weights if pair_weights is not None else out,
        routing.sorted_pair_ids, routing.expert_of_block, routing.num_padded_rows,
        n, k, rows, rank, routing.num_pairs, float(scaling),
        x.stride(0), out.stride(0), lora_in.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        SCHEME=scheme, QBLOCK=qblock, QBLOCK_N=qblock_nk[0], QBLOCK_K=qblock_nk[1], X_ROW_DIV=x_row_div,
        LORA_ROW_DIV=lora_row_div, GATED=gated, HAS_EXPAND=has_expand, MUL_WEIGHT=pair_weights is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_R=block_r,
        GROUP_M=config.group_m, DOT_PRECISION=precision, num_warps=config.num_warps,
    )


def triton_quantized_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: QuantizedExpertWeights,
    down_proj: QuantizedExpertWeights,
    lora: ExpertLoraFactors | None = None,
) -> torch.Tensor:
    """`triton_experts_forward` on a quantized base (inference; the caller has checked the refusals)."""
    num_tokens, top_k = top_k_index.shape
    num_experts, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2
    x = hidden_states.contiguous()
    dtype, device, num_pairs = x.dtype, x.device, num_tokens * top_k
    shape = shape_key(num_experts, hidden, inter)
    config = kernel_config("gate_up", num_tokens, device, shape)
    config_down = kernel_config("down", num_tokens, device, shape)
    config_down = type(config_down)(config.block_m, config_down.block_n, config_down.block_k, config_down.num_warps,
                                    config_down.num_stages, config_down.group_m)  # one routing for every pass
    routing = align_pairs_to_blocks(top_k_index, num_experts, config.block_m)
    pair_weights = top_k_weights.reshape(-1).contiguous()
    precision = dot_precision(dtype)
    p = pack_lora(lora, dtype) if lora is not None else None

    h = torch.empty(num_pairs, inter, dtype=dtype, device=device)
    expand = {}
    if p is not None:
        if is_shared(p.gate_up_A):
            expand = dict(lora_in=x @ p.gate_up_A[0].T, lora_row_div=top_k)  # (T, 2r): once per token
        else:
            a = torch.empty(num_pairs, p.gate_up_A.shape[1], dtype=dtype, device=device)
            launch(ExpertGemm(x, p.gate_up_A, a, routing, config, precision, x_row_div=top_k))
            expand = dict(lora_in=a)
        expand.update(lora_b=p.gate_B, lora_b_up=p.up_B, scaling=p.scaling)
    _quantized_gemm(x, gate_up_proj, h, routing, config, precision, x_row_div=top_k, gated=True, **expand)

    out = torch.empty(num_pairs, hidden, dtype=dtype, device=device)
    down_expand, weighted_rank = {}, None
    if p is not None:
        rank = p.down_A.shape[1]
        if is_shared(p.down_B):  # w * h A_down^T per pair, summed per token, then B_down once per token
            weighted_rank = torch.empty(num_pairs, rank, dtype=dtype, device=device)
            launch(ExpertGemm(h, p.down_A, weighted_rank, routing, config_down, precision, pair_weights=pair_weights))
        else:
            a_down = torch.empty(num_pairs, rank, dtype=dtype, device=device)
            launch(ExpertGemm(h, p.down_A, a_down, routing, config_down, precision))
            down_expand = dict(lora_in=a_down, lora_b=p.down_B, scaling=p.scaling)
    _quantized_gemm(h, down_proj, out, routing, config_down, precision, pair_weights=pair_weights, **down_expand)
    y = out.view(num_tokens, top_k, hidden).sum(dim=1)
    if weighted_rank is None:
        return y
    summed = weighted_rank.view(num_tokens, top_k, -1).sum(dim=1)
    return torch.addmm(y, summed, p.down_B[0].T, alpha=p.scaling)
