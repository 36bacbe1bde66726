"""Triton experts on a quantized base (NF4 or block-wise FP8, `quantized.py`).

Inference: `triton_experts.launch` hands an `ExpertGemm` whose weight is held quantized to
`launch_quantized`, so the experts forward (`_fused_experts`) is the bf16 one. Its kernel is the
grouped GEMM with its weight tiles dequantized in registers from the quantized storage, so a whole expert is never materialised in 16 bits. A tile element
(k, n) is the stored weight's (row n, column k) of the block's expert:
- NF4: the byte at flat index (n * in + k) / 2 of the expert, high nibble for even indices, its
  level times the absmax of block (n * in + k) / block;
- FP8: the e4m3 byte at (n, k), decoded with integer ops (so the interpreter runs it too), times the
  scale_inv of (n / block_n, k / block_k).
The value is cast to the activation dtype before the product, as the torch path dequantizes into the
compute dtype. The LoRA runs as on the bf16 base (the same `_add_expansion` epilogue); the one
difference is that the weighted rank-r shrink of a shared B_down is its own launch.

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

from .quantized import NF4_LEVELS, Fp8ExpertWeights, Nf4ExpertWeights, QuantizedExpertWeights
from .triton_experts import (
    ExpertGemm, _add_expansion, _block_pairs, _tile_of_program, device_guard, interpreter_active, launch_fitting,
)
from .triton_train import _backward_with, _setup_context, _train_backward, _train_forward

NF4, FP8 = 1, 2  # SCHEME values


@functools.lru_cache(maxsize=None)
def _levels(device: torch.device) -> torch.Tensor:
    """The NF4 levels on `device`, made once: no host-to-device copy per call (CUDA graph capture)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@triton.jit
def _e4m3_value(byte):
    """float32 value of e4m3fn codes (int32), decoded with integer ops: the interpreter has no fp8."""
    exponent = (byte >> 3) & 15
    mantissa = (byte & 7).to(tl.float32) / 8.0
    magnitude = tl.where(exponent == 0, mantissa * 0.015625,  # subnormal: m / 8 * 2^-6
                         (1.0 + mantissa) * tl.exp2((exponent - 7).to(tl.float32)))
    value = tl.where((byte & 128) != 0, -magnitude, magnitude)
    return tl.where((byte & 127) == 127, float("nan"), value)  # e4m3fn's only NaN codes, 0x7F / 0xFF


@triton.jit
def _nf4_level(index):
    """The NF4 level of 4-bit indices (int32), selected bit by bit: no table lookup in the inner loop."""
    b0, b1, b2 = (index & 1) != 0, (index & 2) != 0, (index & 4) != 0
    low = tl.where(b2, tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495),
                                tl.where(b0, -0.18477343022823334, -0.28444138169288635)),
                   tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367),
                            tl.where(b0, -0.6961928009986877, -1.0)))
    high = tl.where(b2, tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023),
                                 tl.where(b0, 0.5626170039176941, 0.44070982933044434)),
                    tl.where(b1, tl.where(b0, 0.33791524171829224, 0.24611230194568634),
                             tl.where(b0, 0.16093020141124725, 0.07958029955625534)))
    return tl.where((index & 8) != 0, high, low)


@triton.jit
def _weight_tile(q_ptr, scale_ptr, levels_ptr, expert, rows, k0, n_ok, OUT, IN, SCHEME: tl.constexpr,
                 QBLOCK: tl.constexpr, QBLOCK_N: tl.constexpr, QBLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, ROW_SCALES: tl.constexpr, NATIVE_FP8: tl.constexpr):
    """(BLOCK_K, BLOCK_N) float32 weights: columns k0.. of stored rows `rows` of `expert`.

    With ROW_SCALES (the K step lies inside one scale block and IN is a multiple of it, so no K mask
    either) each row's scale is one value per step, loaded as a vector, and NF4 bytes are read once as
    a (BLOCK_K / 2, BLOCK_N) tile whose two nibbles are interleaved in registers; FP8 is converted by
    the hardware (NATIVE_FP8, not in the interpreter). Otherwise every element is decoded on its own."""
    if not ROW_SCALES:
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = (cols < IN)[:, None] & n_ok[None, :]
        return _dequantized_tile(q_ptr, scale_ptr, levels_ptr, expert, rows, cols, mask, OUT, IN,
                                 SCHEME, QBLOCK, QBLOCK_N, QBLOCK_K)
    r = rows.to(tl.int64)
    expert = expert.to(tl.int64)
    if SCHEME == 1:
        half = tl.arange(0, BLOCK_K // 2)
        byte = tl.load(q_ptr + expert * (OUT * IN // 2) + r[None, :] * (IN // 2) + k0 // 2 + half[:, None],
                       mask=n_ok[None, :], other=0).to(tl.int32)  # (BK / 2, BN): k = k0 + 2i (high), +1 (low)
        pairs = tl.join(_nf4_level(byte >> 4), _nf4_level(byte & 15))  # (BK / 2, BN, 2)
        tile = tl.reshape(tl.permute(pairs, (0, 2, 1)), (BLOCK_K, BLOCK_N))
        absmax = tl.load(scale_ptr + expert * (OUT * IN // QBLOCK) + r * (IN // QBLOCK) + k0 // QBLOCK,
                         mask=n_ok, other=0.0)
        return tile * absmax[None, :]
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        ptrs = q_ptr + expert * OUT * IN + r[None, :] * IN + cols[:, None]
        if NATIVE_FP8:
            value = tl.load(ptrs, mask=n_ok[None, :], other=0.0).to(tl.float32)
        else:
            value = _e4m3_value(tl.load(ptrs, mask=n_ok[None, :], other=0).to(tl.int32))
        scale_cols = IN // QBLOCK_K
        scale = tl.load(scale_ptr + expert * (OUT // QBLOCK_N) * scale_cols + (r // QBLOCK_N) * scale_cols
                        + k0 // QBLOCK_K, mask=n_ok, other=0.0)
        return value * scale[None, :]


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
        value = _e4m3_value(tl.load(q_ptr + expert * OUT * IN + r * IN + c, mask=mask, other=0).to(tl.int32))
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
    stride_xm, stride_xk, stride_om, stride_on, stride_lm, stride_lk,
    stride_be, stride_bn, stride_bk,
    SCHEME: tl.constexpr,
    QBLOCK: tl.constexpr,
    QBLOCK_N: tl.constexpr,
    QBLOCK_K: tl.constexpr,
    ROW_SCALES: tl.constexpr,
    NATIVE_FP8: tl.constexpr,
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
    x_ptrs = x_ptr + (pair // X_ROW_DIV)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=row_ok[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        b = _weight_tile(q_ptr, scale_ptr, levels_ptr, expert, offs_n, k0, n_ok, OUT, K, SCHEME, QBLOCK, QBLOCK_N,
                         QBLOCK_K, BLOCK_N, BLOCK_K, ROW_SCALES, NATIVE_FP8)
        acc += tl.dot(a, b.to(a.dtype), input_precision=DOT_PRECISION)
        if GATED:
            b_up = _weight_tile(q_ptr, scale_ptr, levels_ptr, expert, offs_n + N, k0, n_ok, OUT, K, SCHEME, QBLOCK,
                                QBLOCK_N, QBLOCK_K, BLOCK_N, BLOCK_K, ROW_SCALES, NATIVE_FP8)
            acc_up += tl.dot(a, b_up.to(a.dtype), input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
    if HAS_EXPAND:
        acc, acc_up = _add_expansion(acc, acc_up, lora_in_ptr, lora_b_ptr, lora_b_up_ptr, pair, expert, offs_n, row_ok,
                                     n_ok, R, scaling, stride_lm, stride_lk, stride_be, stride_bn, stride_bk,
                                     LORA_ROW_DIV, GATED, BLOCK_R, DOT_PRECISION)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # SiLU(gate) * up
    if MUL_WEIGHT:
        acc = acc * tl.load(pair_weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pair[:, None] * stride_om + offs_n[None, :] * stride_on
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
    """`triton_train`'s forward and backward with the base dequantized per call (same inputs as its custom
    op); the context keeps the quantized modules, never a dequantized weight (gradient checkpointing
    recomputes it like the rest)."""

    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, gate_up: QuantizedExpertWeights, down: QuantizedExpertWeights,
                *factors_and_scaling):
        with device_guard(x):
            output = _train_forward(x, top_k_index, top_k_weights, dequantized(gate_up, x.dtype),
                                    dequantized(down, x.dtype), *factors_and_scaling)
        none = x.new_empty(0)  # what `_setup_context` saves for the base: nothing weight-sized
        _setup_context(ctx, (x, top_k_index, top_k_weights, none, none, *factors_and_scaling), output)
        ctx.quantized = (gate_up, down)
        return output

    @staticmethod
    def backward(ctx, dy, *_kept_grads):
        def dequantizing_backward(dy, x, top_k_weights, _gate_up, _down, *rest):
            dense = [dequantized(w, x.dtype) for w in ctx.quantized]
            return _train_backward(dy, x, top_k_weights, *dense, *rest)

        with device_guard(dy):
            return _backward_with(dequantizing_backward, ctx, dy)


def launch_quantized(gemm: ExpertGemm, lora_in: torch.Tensor, lora_b: torch.Tensor, lora_b_up: torch.Tensor,
                     rank: int, block_r: int) -> None:
    """`triton_experts.launch` for a weight held quantized (it has checked the shapes and the expansion and
    passes its unpacked pointers): the same problem on `_quantized_grouped_gemm_kernel`."""
    x, weight, out, routing, config, gated = gemm.x, gemm.weight, gemm.out, gemm.routing, gemm.config, gemm.gated
    if gemm.shrink is not None or gemm.store_pre is not None:
        raise ValueError("the quantized GEMM has no fused shrink and keeps no pre-activation: launch the shrink "
                         "as its own ExpertGemm")
    num_experts, rows, k = weight.shape
    n = rows // 2 if gated else rows
    scheme, q, scale, qblock, qblock_nk = _storage(weight)
    # FP8 steps go down to tl.dot's least K (16). NF4 steps stay >= 64: on triton 3.6 / H200 a 16-bit
    # dot on the interleaved nibble tile of a 16-wide step came out wrong, while float32 was right.
    block_k, row_scales = _k_step(config.block_k, k, *((qblock, 64) if scheme == NF4 else (qblock_nk[1], 16)))
    native_fp8 = scheme == FP8 and row_scales and not interpreter_active()  # the per-element decoding reads bytes
    if native_fp8:
        q = q.view(torch.float8_e4m3fn)  # converted by the hardware
    expand = gemm.expansion
    lora_row_div, scaling = (expand.row_div, expand.scaling) if expand is not None else (1, 0.0)
    pair_weights = gemm.pair_weights
    grid = (routing.max_blocks * triton.cdiv(n, config.block_n),)
    launch_fitting(
        _quantized_grouped_gemm_kernel, grid, (scheme, gated, expand is not None, block_r, config, block_k, gemm.precision),
        config.num_stages,
        x, q, scale, _levels(x.device), out, lora_in, lora_b, lora_b_up, pair_weights if pair_weights is not None else out,
        routing.sorted_pair_ids, routing.expert_of_block, routing.num_padded_rows,
        n, k, rows, rank, routing.num_pairs, float(scaling),
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), lora_in.stride(0), lora_in.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        SCHEME=scheme, QBLOCK=qblock, QBLOCK_N=qblock_nk[0], QBLOCK_K=qblock_nk[1], ROW_SCALES=row_scales,
        NATIVE_FP8=native_fp8, X_ROW_DIV=gemm.x_row_div, LORA_ROW_DIV=lora_row_div, GATED=gated,
        HAS_EXPAND=expand is not None, MUL_WEIGHT=pair_weights is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        GROUP_M=config.group_m, DOT_PRECISION=gemm.precision, num_warps=config.num_warps,
    )


def _k_step(block_k: int, k: int, scale_block: int, least: int) -> tuple[int, bool]:
    """The K step and whether each row's scale is one value per step (`_weight_tile`'s ROW_SCALES): the
    tuned step (at least `least`), halved down to `least` until it lies inside one scale block."""
    step = max(block_k, least)
    while step > least and scale_block % step:
        step //= 2
    if scale_block % step or k % scale_block:
        return block_k, False
    return step, True
