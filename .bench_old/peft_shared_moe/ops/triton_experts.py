"""Triton fused experts for inference: base experts and shared-outer / per-expert LoRA, no autograd.

Layers of one op, as in the Triton tutorials and vLLM's fused_moe:
`_grouped_gemm_kernel` (one jit kernel) -> `_launch` (strides, grid, shape checks) ->
`triton_experts_forward` (the passes of one MoE layer) -> registered as the "triton" backend.

The passes for one layer (shared-outer adapter):
1. `a = x @ [A_gate; A_up]^T`                       once per token, (T, 2r)   (torch matmul)
2. gate_up kernel: per expert block, x W_gu^T + s a B_gu^T, epilogue SiLU(gate) * up -> h (S, I)
3. down kernel: per expert block, w * h W_down^T -> (S, H), and on the n = 0 programs the fused
   shrink w * h A_down^T -> (S, r)
4. per token: y = sum_k (S, H) rows + s (sum_k (S, r) rows) B_down^T   (B_down once per token)
Per-expert A or B adds one small grouped pass each (the shrink for A, the down expansion for B).
The pure-torch reference beside these kernels is `torch_experts.experts_forward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from .block_routing import BlockRouting, align_pairs_to_blocks
from .kernel_configs import KernelConfig, kernel_config
from .torch_experts import ExpertLoraFactors, is_shared


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    x_ptr,  # input rows; row of pair p is p // X_ROW_DIV
    w_ptr,  # (E, N_w, K) expert weights
    out_ptr,  # (S, N) output rows, indexed by pair id
    lora_in_ptr,  # (rows, R or 2R) rank-r activations; row of pair p is p // LORA_ROW_DIV
    lora_b_ptr,  # (E, N_w, R) expansion factor
    shrink_w_ptr,  # (E, R, K) fused shrink factor
    shrink_out_ptr,  # (S, R)
    pair_weight_ptr,  # (S,) routing weight of each pair
    sorted_pair_ids_ptr,
    expert_of_block_ptr,
    num_padded_rows_ptr,
    # sizes
    N,  # output columns (I for the gated kernel, whose weight has 2I rows)
    K,
    R,
    num_pairs,
    scaling,
    # strides
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_om, stride_on,
    stride_lm, stride_lk,
    stride_be, stride_bn, stride_bk,
    stride_se, stride_sr, stride_sk,
    stride_tm, stride_tr,
    # meta
    X_ROW_DIV: tl.constexpr,
    LORA_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    HAS_EXPAND: tl.constexpr,
    HAS_SHRINK: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_rows_ptr):
        return
    expert = tl.load(expert_of_block_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    pair = tl.where(row_ok, pair, 0).to(tl.int64)
    x_row = pair // X_ROW_DIV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R

    x_ptrs = x_ptr + x_row[:, None] * stride_xm + offs_k[None, :] * stride_xk
    if MUL_WEIGHT:
        weight = tl.load(pair_weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)

    if HAS_SHRINK:
        # One extra column of programs does the rank-r shrink of the same rows; keeping it out of
        # the main loop leaves that loop branch-free, so it pipelines as well as the base GEMM.
        is_shrink_program = pid_n * BLOCK_N >= N
    else:
        is_shrink_program = False
    if is_shrink_program:
        acc_r = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        s_ptrs = shrink_w_ptr + expert * stride_se + offs_r[None, :] * stride_sr + offs_k[:, None] * stride_sk
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            s = tl.load(s_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc_r += tl.dot(a, s.to(a.dtype))
            x_ptrs += BLOCK_K * stride_xk
            s_ptrs += BLOCK_K * stride_sk
        if MUL_WEIGHT:
            acc_r = acc_r * weight[:, None]
        t_ptrs = shrink_out_ptr + pair[:, None] * stride_tm + offs_r[None, :] * stride_tr
        tl.store(t_ptrs, acc_r.to(shrink_out_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])
    else:
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BK, BN)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(a, b.to(a.dtype))
            if GATED:
                b_up = tl.load(w_ptrs + N * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc_up += tl.dot(a, b_up.to(a.dtype))
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        if HAS_EXPAND:
            lora_row = pair // LORA_ROW_DIV
            l_ptrs = lora_in_ptr + lora_row[:, None] * stride_lm + offs_r[None, :] * stride_lk  # (BM, BR)
            b_ptrs = lora_b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_bk
            la = tl.load(l_ptrs, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            lb = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc += scaling * tl.dot(la, lb.to(la.dtype))
            if GATED:
                la_up = tl.load(l_ptrs + R * stride_lk, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                lb_up = tl.load(b_ptrs + N * stride_bn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                acc_up += scaling * tl.dot(la_up, lb_up.to(la_up.dtype))

        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # SiLU(gate) * up
        if MUL_WEIGHT:
            acc = acc * weight[:, None]
        out_ptrs = out_ptr + pair[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


_STAGES_THAT_FIT: dict[tuple, int] = {}


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    routing: BlockRouting,
    config: KernelConfig,
    *,
    x_row_div: int,
    gated: bool = False,
    expand: Optional[tuple[torch.Tensor, torch.Tensor, int, float]] = None,
    shrink: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    pair_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One grouped GEMM over the expert blocks; see `_grouped_gemm_kernel` for the fused extras.

    expand = (lora_in, lora_b, lora_row_div, scaling); shrink = (shrink_w, shrink_out).
    """
    num_experts, n_w, k = weight.shape
    n = n_w // 2 if gated else n_w
    if x.shape[-1] != k or out.shape != (routing.num_pairs, n):
        raise ValueError(f"grouped GEMM shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, out {tuple(out.shape)}")
    rank = 0
    # Unused pointers get stand-ins (never read: the flags compile those loads away).
    lora_in, lora_b, lora_row_div, scaling = expand if expand is not None else (out, weight, 1, 0.0)
    shrink_w, shrink_out = shrink if shrink is not None else (weight, out)
    if expand is not None:
        rank = lora_b.shape[-1]
    if shrink is not None:
        rank = shrink_w.shape[1]
    block_r = max(16, triton.next_power_of_2(max(rank, 1)))
    grid = (routing.max_blocks, triton.cdiv(n, config.block_n) + (shrink is not None))
    flags = (gated, expand is not None, shrink is not None, block_r, config)
    stages = _STAGES_THAT_FIT.get(flags, config.num_stages)
    while True:
        try:
            _grouped_gemm_kernel[grid](
                x, weight, out, lora_in, lora_b, shrink_w, shrink_out,
                pair_weights if pair_weights is not None else out,
                routing.sorted_pair_ids, routing.expert_of_block, routing.num_padded_rows,
                n, k, rank, routing.num_pairs, float(scaling),
                x.stride(0), x.stride(1),
                weight.stride(0), weight.stride(1), weight.stride(2),
                out.stride(0), out.stride(1),
                lora_in.stride(0), lora_in.stride(1),
                lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
                shrink_w.stride(0), shrink_w.stride(1), shrink_w.stride(2),
                shrink_out.stride(0), shrink_out.stride(1),
                X_ROW_DIV=x_row_div,
                LORA_ROW_DIV=lora_row_div,
                GATED=gated,
                HAS_EXPAND=expand is not None,
                HAS_SHRINK=shrink is not None,
                MUL_WEIGHT=pair_weights is not None,
                BLOCK_M=config.block_m,
                BLOCK_N=config.block_n,
                BLOCK_K=config.block_k,
                BLOCK_R=block_r,
                num_warps=config.num_warps,
                num_stages=stages,
            )
            break
        except triton.runtime.errors.OutOfResources:
            # A tuned tile can overflow shared memory once a large rank adds its tiles: fewer stages.
            if stages <= 1:
                raise
            stages -= 1
    _STAGES_THAT_FIT[flags] = stages
    return out


@dataclass(frozen=True)
class PackedExpertLora:
    """An adapter's factors in the kernels' layout and dtype: gate and up stacked along the rank / rows."""

    gate_up_A: torch.Tensor  # (1|E, 2r, H)
    gate_up_B: torch.Tensor  # (E, 2I, r)
    down_A: torch.Tensor  # (E, r, I)
    down_B: torch.Tensor  # (1|E, H, r)
    scaling: float


# gate_B of an adapter -> (stamp of all its factors, packed factors); entries die with the adapter.
_PACKED = WeakIdKeyDictionary()


def pack_lora(lora: ExpertLoraFactors, dtype: torch.dtype) -> PackedExpertLora:
    """Packed factors, cached per adapter until any factor is modified (training step, load, merge).

    Resident adapters are packed once, so switching the active adapter costs no copy per call.
    Under torch.compile the packing is traced into the graph instead (no cache there).
    """
    factors = (lora.gate_A, lora.gate_B, lora.up_A, lora.up_B, lora.down_A, lora.down_B)
    stamp = None
    if not torch.compiler.is_compiling():
        stamp = (dtype, lora.scaling) + tuple((t.data_ptr(), t._version) for t in factors)
        cached = _PACKED.get(lora.gate_B)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    packed = PackedExpertLora(
        gate_up_A=torch.cat([lora.gate_A, lora.up_A], dim=1).to(dtype).contiguous(),
        gate_up_B=torch.cat([lora.gate_B, lora.up_B], dim=1).to(dtype).contiguous(),
        down_A=lora.down_A.to(dtype).contiguous(),
        down_B=lora.down_B.to(dtype).contiguous(),
        scaling=lora.scaling,
    )
    if stamp is not None:
        _PACKED[lora.gate_B] = (stamp, packed)
    return packed


def triton_experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    lora: Optional[ExpertLoraFactors] = None,
) -> torch.Tensor:
    """Same contract as `torch_experts.experts_forward` for SiLU experts, for inference (no autograd).

    The LoRA factors run in the activation dtype, packed once per adapter (`pack_lora`).
    """
    p = pack_lora(lora, hidden_states.dtype) if lora is not None else None
    if not torch.compiler.is_compiling():  # eager and CUDA-graph capture: skip the op dispatcher's cost
        return _fused_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, p)
    return fused_experts(
        hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj,
        *((p.gate_up_A, p.gate_up_B, p.down_A, p.down_B) if p is not None else (None,) * 4),
        p.scaling if p is not None else 0.0,
    )


@torch.library.custom_op("peft_shared_moe::fused_experts", mutates_args=())
def fused_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_A: Optional[torch.Tensor],
    gate_up_B: Optional[torch.Tensor],
    down_A: Optional[torch.Tensor],
    down_B: Optional[torch.Tensor],
    scaling: float,
) -> torch.Tensor:
    """The whole layer as one opaque op, so torch.compile and CUDA graphs treat it as a unit."""
    packed = None
    if gate_up_A is not None:
        packed = PackedExpertLora(gate_up_A, gate_up_B, down_A, down_B, scaling)
    return _fused_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, packed)


@fused_experts.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, *lora_and_scaling):
    return hidden_states.new_empty(hidden_states.shape)


def _fused_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    packed: Optional[PackedExpertLora],
) -> torch.Tensor:
    num_tokens, top_k = top_k_index.shape
    num_experts, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2
    dtype = hidden_states.dtype
    x = hidden_states.contiguous()
    num_pairs = num_tokens * top_k
    config_up = kernel_config("gate_up", num_tokens, x.device)
    config_down = kernel_config("down", num_tokens, x.device)
    routing_up = align_pairs_to_blocks(top_k_index, num_experts, config_up.block_m)
    routing_down = (
        routing_up
        if config_down.block_m == config_up.block_m
        else align_pairs_to_blocks(top_k_index, num_experts, config_down.block_m)
    )
    pair_weights = top_k_weights.reshape(-1).contiguous()

    h = torch.empty(num_pairs, inter, dtype=dtype, device=x.device)
    expand = None
    if packed is not None:
        if is_shared(packed.gate_up_A):
            a = x @ packed.gate_up_A[0].T  # (T, 2r): shared A once per token
            expand = (a, packed.gate_up_B, top_k, packed.scaling)
        else:
            a = torch.empty(num_pairs, packed.gate_up_A.shape[1], dtype=dtype, device=x.device)
            _launch(x, packed.gate_up_A, a, routing_up, config_up, x_row_div=top_k)  # (S, 2r)
            expand = (a, packed.gate_up_B, 1, packed.scaling)
    _launch(x, gate_up_proj, h, routing_up, config_up, x_row_div=top_k, gated=True, expand=expand)

    rank_out = packed.down_B.shape[-1] if packed is not None and is_shared(packed.down_B) else 0
    # Shared B_down: the routing-weighted shrink lands in `rank_out` extra columns beside the down
    # output, so one per-token sum reduces both.
    out = torch.empty(num_pairs, hidden + rank_out, dtype=dtype, device=x.device)
    shrink = down_expand = None
    if rank_out:
        shrink = (packed.down_A, out[:, hidden:])
    elif packed is not None:
        a_down = torch.empty(num_pairs, packed.down_A.shape[1], dtype=dtype, device=x.device)
        _launch(h, packed.down_A, a_down, routing_down, config_down, x_row_div=1)
        down_expand = (a_down, packed.down_B, 1, packed.scaling)
    _launch(
        h, down_proj, out[:, :hidden], routing_down, config_down,
        x_row_div=1, expand=down_expand, shrink=shrink, pair_weights=pair_weights,
    )
    summed = out.view(num_tokens, top_k, hidden + rank_out).sum(dim=1)  # (T, H + r)
    if not rank_out:
        return summed
    # B_down once per token, on the routing-weighted sum of the rank-r activations
    return torch.addmm(summed[:, :hidden], summed[:, hidden:], packed.down_B[0].T, alpha=packed.scaling)
