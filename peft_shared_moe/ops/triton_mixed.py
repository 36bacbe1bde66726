"""Triton experts for mixed-adapter batches: every token carries its own adapter, or none.

PEFT's `adapter_names=[...]` gives one adapter per sample. Here all of them run in one pass over
the experts, blocked by expert as in `triton_experts.py`, so each expert's base weights are read
once per layer whatever the number of adapters. Rows of one block may belong to different adapters:
each LoRA product loops over the adapters ("slots") present in the block, masking the other rows.

Adapters are read in place through a slot table (`SlotTable`): one row per adapter with its six
factors' addresses, its rank and which of its outer factors are shared. Ranks and layouts may differ
between adapters; shared factors are still applied once per token:

1. `_mixed_shrink_kernel`: `x A^T` per token for slots with a shared gate/up A, per pair (in expert
   blocks) for slots with per-expert A; written in one (rows, 2 R) layout, R = the padded rank.
2. `_mixed_expert_gemm_kernel` (gated): x W_gu^T + s (A x) B_gu^T with the row's slot, SiLU * up -> h.
3. `_mixed_shrink_kernel` on h: `h A_down^T` per pair (A_down is per expert in both layouts).
4. `_mixed_expert_gemm_kernel` (down): w * (h W_d^T + s (A_d h) B_d^T), the expansion for slots whose
   B_down is per expert.
5. `_mixed_combine_kernel`: per token, the sum over its pairs plus, for slots with a shared B_down,
   s (sum_k w_k A_d h_k) B_down^T once per token.

Inference only (no autograd). The reference is the torch path run per adapter group
(`ExpertsLoraLayer._mixed_batch_forward` with backend "torch"), which the tests compare against.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..factors import EXPERT_FACTORS
from .block_routing import BlockRouting, align_pairs_to_blocks
from .experts_layout import ExpertsLayout
from .kernel_configs import KernelConfig, kernel_config, shape_key
from .quantized import holds_quantized
from .torch_experts import ExpertLoraFactors, is_shared
from .triton_experts import (
    ExpertGemm, _block_pairs, _expert_gemm, _tile_of_program, dot_precision, launch_fitting, needs_autograd,
    triton_refusals,
)
from .triton_support import TritonBackendError

# Columns of a slot table row: the six factors' addresses (EXPERT_FACTORS order: gate A, gate B,
# up A, up B, down A, down B), the rank, and whether gate/up A and down B are shared.
GATE_A, GATE_B, UP_A, UP_B, DOWN_A, DOWN_B, RANK, SHARED_A, SHARED_B = range(9)
TABLE_WIDTH = 9  # written out as 9 in the kernels
DEFAULT_STAGES = 3  # triton's default; the kernels without a tuned tile start here (launch_fitting)


@triton.jit
def _slot_factor(table_ptr, slot, column: tl.constexpr, like_ptr):
    """The address of one of `slot`'s factors, typed like `like_ptr` (all factors share one dtype)."""
    return tl.load(table_ptr + slot * 9 + column).to(tl.pointer_type(like_ptr.dtype.element_ty))


@triton.jit
def _mixed_shrink_kernel(
    x_ptr,  # (rows of x, K) activations, contiguous along K
    out_ptr,  # (num_rows, BLOCK_R or 2 BLOCK_R) rank-r activations of each row, in its slot's columns 0..r
    table_ptr,  # (slots, 9) int64 slot table
    factor_ptr,  # any factor: gives the factors' dtype
    row_slot_ptr,  # (tokens,) int32 slot of each token, -1 for none
    sorted_pair_ids_ptr,
    expert_of_block_ptr,
    num_padded_rows_ptr,
    num_rows,  # tokens, or pairs with PAIR_ROWS
    K,
    num_slots,
    stride_xm,
    stride_om,
    A_COLUMN: tl.constexpr,  # the factor (gate A, or down A); with TWO_FACTORS up A is A_COLUMN + 2
    TWO_FACTORS: tl.constexpr,
    PAIR_ROWS: tl.constexpr,  # rows are pairs in expert blocks and A is per expert; else tokens, A shared
    SERVES_SHARED: tl.constexpr,  # -1: every slot; 0 / 1: only slots whose SHARED_A flag equals it
    X_ROW_DIV: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    if PAIR_ROWS:
        if pid * BLOCK_M >= tl.load(num_padded_rows_ptr):
            return
        expert, row, row_ok = _block_pairs(pid, sorted_pair_ids_ptr, expert_of_block_ptr, num_rows, BLOCK_M)
        x_row = row // X_ROW_DIV
        token = row // TOP_K
    else:
        expert = 0
        row_ok = offs_m < num_rows
        row = tl.where(row_ok, offs_m, 0).to(tl.int64)
        x_row = row
        token = row
    slot = tl.load(row_slot_ptr + token, mask=row_ok, other=-1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(0, num_slots):
        mine = row_ok & (slot == s)
        count = tl.sum(mine.to(tl.int32), axis=0)
        if SERVES_SHARED >= 0:
            count = tl.where(tl.load(table_ptr + s * 9 + 7) == SERVES_SHARED, count, 0)
        if count > 0:
            rank = tl.load(table_ptr + s * 9 + 6)
            r_ok = offs_r < rank
            a_ptrs = _slot_factor(table_ptr, s, A_COLUMN, factor_ptr) + expert * rank * K \
                + offs_r[None, :] * K + offs_k[:, None]  # (BK, BR) of the (E|1, r, K) factor
            if TWO_FACTORS:
                up_ptrs = _slot_factor(table_ptr, s, A_COLUMN + 2, factor_ptr) + expert * rank * K \
                    + offs_r[None, :] * K + offs_k[:, None]
            x_ptrs = x_ptr + x_row[:, None] * stride_xm + offs_k[None, :]
            for k0 in range(0, K, BLOCK_K):
                k_ok = offs_k < K - k0
                xt = tl.load(x_ptrs, mask=mine[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                acc += tl.dot(xt, at.to(xt.dtype), input_precision=DOT_PRECISION)
                if TWO_FACTORS:
                    ut = tl.load(up_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                    acc_up += tl.dot(xt, ut.to(xt.dtype), input_precision=DOT_PRECISION)
                    up_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
                a_ptrs += BLOCK_K
    out_ptrs = out_ptr + row[:, None] * stride_om + offs_r[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if TWO_FACTORS:
        tl.store(out_ptrs + BLOCK_R, acc_up.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _slot_expansion(acc, lora_ptr, lora_row, stride_lm, column_offset, mine, table_ptr, slot, b_column: tl.constexpr,
                    factor_ptr, expert, N, offs_n, n_ok, offs_r, scale, rank, DOT_PRECISION: tl.constexpr):
    """acc + scale * (rank-r activations of the slot's rows) @ the slot's (E|1, N, r) factor's tile."""
    r_ok = offs_r < rank
    l_ptrs = lora_ptr + lora_row[:, None] * stride_lm + column_offset + offs_r[None, :]
    la = tl.load(l_ptrs, mask=mine[:, None] & r_ok[None, :], other=0.0)
    b_ptrs = _slot_factor(table_ptr, slot, b_column, factor_ptr) + expert * N * rank \
        + offs_n[None, :] * rank + offs_r[:, None]  # (BR, BN)
    lb = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    return acc + scale * tl.dot(la, lb.to(la.dtype), input_precision=DOT_PRECISION)


@triton.jit
def _mixed_expert_gemm_kernel(
    x_ptr,  # input rows; row of pair p is p // X_ROW_DIV
    w_ptr,  # (E, N_w, K) base expert weights
    out_ptr,  # (S, N)
    pair_weight_ptr,  # (S,) routing weights, with MUL_WEIGHT
    token_lora_ptr,  # (T, 2 BLOCK_R) rank-r activations of slots with shared A (GATED only)
    pair_lora_ptr,  # (S, 2 BLOCK_R | BLOCK_R) rank-r activations per pair, strided like token_lora
    table_ptr,
    scaling_ptr,  # (slots,) float32
    factor_ptr,
    row_slot_ptr,
    sorted_pair_ids_ptr,
    expert_of_block_ptr,
    num_padded_rows_ptr,
    N,
    K,
    num_pairs,
    num_slots,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_om,
    stride_lm,
    X_ROW_DIV: tl.constexpr,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,  # gate/up: expansion with gate B and up B for every slot; else down B, per-expert slots only
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
    offs_r = tl.arange(0, BLOCK_R)
    x_ptrs = x_ptr + (pair // X_ROW_DIV)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc, acc_up = _expert_gemm(x_ptrs, w_ptrs, row_ok, n_ok, offs_k, K, stride_xk, stride_wk, N * stride_wn,
                               GATED, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)

    slot = tl.load(row_slot_ptr + pair // TOP_K, mask=row_ok, other=-1)
    for s in range(0, num_slots):
        mine = row_ok & (slot == s)
        count = tl.sum(mine.to(tl.int32), axis=0)
        shared_a = tl.load(table_ptr + s * 9 + 7)
        if not GATED:  # a shared B_down is applied per token, after the routing-weighted sum
            count = tl.where(tl.load(table_ptr + s * 9 + 8) != 0, 0, count)
        if count > 0:
            rank = tl.load(table_ptr + s * 9 + 6)
            scale = tl.load(scaling_ptr + s)
            if GATED:
                # shared A: the token's activations; per-expert A: the pair's (masked loads pick one)
                # (tl.where, not `mine & flag`: the interpreter gives the latter a non-boolean dtype)
                from_token = tl.where(shared_a != 0, mine, False)
                from_pair = tl.where(shared_a == 0, mine, False)
                acc = _slot_expansion(acc, token_lora_ptr, pair // TOP_K, stride_lm, 0, from_token, table_ptr, s,
                                      1, factor_ptr, expert, N, offs_n, n_ok, offs_r, scale, rank, DOT_PRECISION)
                acc = _slot_expansion(acc, pair_lora_ptr, pair, stride_lm, 0, from_pair, table_ptr, s,
                                      1, factor_ptr, expert, N, offs_n, n_ok, offs_r, scale, rank, DOT_PRECISION)
                acc_up = _slot_expansion(acc_up, token_lora_ptr, pair // TOP_K, stride_lm, BLOCK_R, from_token,
                                         table_ptr, s, 3, factor_ptr, expert, N, offs_n, n_ok, offs_r, scale, rank,
                                         DOT_PRECISION)
                acc_up = _slot_expansion(acc_up, pair_lora_ptr, pair, stride_lm, BLOCK_R, from_pair,
                                         table_ptr, s, 3, factor_ptr, expert, N, offs_n, n_ok, offs_r, scale, rank,
                                         DOT_PRECISION)
            else:
                acc = _slot_expansion(acc, pair_lora_ptr, pair, stride_lm, 0, mine, table_ptr, s,
                                      5, factor_ptr, expert, N, offs_n, n_ok, offs_r, scale, rank, DOT_PRECISION)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # SiLU(gate) * up
    if MUL_WEIGHT:
        acc = acc * tl.load(pair_weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pair[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _mixed_combine_kernel(
    pair_out_ptr,  # (S, N) routing-weighted pair outputs
    a_down_ptr,  # (S, BLOCK_R) h A_down^T per pair, unweighted
    pair_weight_ptr,
    out_ptr,  # (T, N)
    table_ptr,
    scaling_ptr,
    factor_ptr,
    row_slot_ptr,
    num_tokens,
    N,
    num_slots,
    stride_pm,
    stride_lm,
    stride_om,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    token = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = token < num_tokens
    token = tl.where(t_ok, token, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rank_sum = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j in range(TOP_K):
        pair = token * TOP_K + j
        acc += tl.load(pair_out_ptr + pair[:, None] * stride_pm + offs_n[None, :],
                       mask=t_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        weight = tl.load(pair_weight_ptr + pair, mask=t_ok, other=0.0).to(tl.float32)
        rank_sum += weight[:, None] * tl.load(a_down_ptr + pair[:, None] * stride_lm + offs_r[None, :],
                                              mask=t_ok[:, None], other=0.0).to(tl.float32)
    # the sum is rounded to the activation dtype, as the single-adapter path's per-token sum is
    rank_sum = rank_sum.to(a_down_ptr.dtype.element_ty)
    slot = tl.load(row_slot_ptr + token, mask=t_ok, other=-1)
    for s in range(0, num_slots):
        mine = t_ok & (slot == s)
        count = tl.where(tl.load(table_ptr + s * 9 + 8) != 0, tl.sum(mine.to(tl.int32), axis=0), 0)
        if count > 0:
            rank = tl.load(table_ptr + s * 9 + 6)
            r_ok = offs_r < rank
            la = tl.where(mine[:, None] & r_ok[None, :], rank_sum, 0.0)
            b_ptrs = _slot_factor(table_ptr, s, 5, factor_ptr) + offs_n[None, :] * rank + offs_r[:, None]
            lb = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.load(scaling_ptr + s) * tl.dot(la, lb.to(la.dtype), input_precision=DOT_PRECISION)
    tl.store(out_ptr + token[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class SlotTable:
    """The adapters of one mixed batch as the kernels read them, in place."""

    table: torch.Tensor  # (slots, 9) int64 on the device (columns above)
    scaling: torch.Tensor  # (slots,) float32
    factors: tuple[torch.Tensor, ...]  # what the addresses point at, kept alive for the launches
    block_r: int  # the largest rank, padded to a power of two >= 16
    any_shared_a: bool
    any_expert_a: bool
    any_shared_b: bool


# Slot tables keyed by their own content (addresses, ranks, flags, scalings): a hit returns exactly
# the table that would be built, so it can never point at other data; the kernels read the factors
# live at those addresses, never a copy, so a cached table cannot serve stale values either.
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_MAX_TABLES = 64


def _cached_table(rows: list[list[int]], scalings: Sequence[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows as an int64 device tensor, scalings as a float32 one), built once per distinct content."""
    key = (tuple(map(tuple, rows)), tuple(scalings), device)
    cached = _TABLES.pop(key, None)
    if cached is None:
        if len(_TABLES) >= _MAX_TABLES:
            del _TABLES[next(iter(_TABLES))]  # the least recently used
        cached = (torch.tensor(rows, dtype=torch.int64).to(device),
                  torch.tensor(list(scalings), dtype=torch.float32).to(device))
    _TABLES[key] = cached  # (re)inserted last: most recently used
    if device.type == "cuda":  # an evicted table is not reused before this stream's kernels ran
        for t in cached:
            t.record_stream(torch.cuda.current_stream(device))
    return cached


def slot_table(adapters: Sequence[ExpertLoraFactors], device: torch.device) -> SlotTable:
    factors = [lora[f].contiguous() for lora in adapters for f in EXPERT_FACTORS]  # one dtype (mixed_refusals)
    rows = []
    for i, lora in enumerate(adapters):
        own = factors[i * 6:(i + 1) * 6]
        rank = lora["w1.lora_A"].shape[1]
        # every factor of a row has the rank and dtype recorded with it, so the addresses fix the shapes
        rows.append([t.data_ptr() for t in own] + [rank, int(is_shared(own[0])), int(is_shared(own[5]))])
    table, scaling = _cached_table(rows, [a.scaling for a in adapters], device)
    max_rank = max(r[RANK] for r in rows)
    return SlotTable(
        table=table, scaling=scaling, factors=tuple(factors),
        block_r=max(16, triton.next_power_of_2(max_rank)),
        any_shared_a=any(r[SHARED_A] for r in rows), any_expert_a=not all(r[SHARED_A] for r in rows),
        any_shared_b=any(r[SHARED_B] for r in rows),
    )


def mixed_adapter_problems(adapters: Sequence[ExpertLoraFactors], num_experts: int, hidden: int, inter: int) -> list[str]:
    """Shapes the kernels' address arithmetic relies on; each mismatch names the adapter slot and factor."""
    problems = []
    for i, lora in enumerate(adapters):
        rank = lora["w1.lora_A"].shape[1]
        expected = {
            "w1.lora_A": (rank, hidden), "w3.lora_A": (rank, hidden), "w1.lora_B": (inter, rank),
            "w3.lora_B": (inter, rank), "w2.lora_A": (rank, inter), "w2.lora_B": (hidden, rank),
        }
        for f, tail in expected.items():
            t = lora[f]
            if t.dim() != 3 or tuple(t.shape[1:]) != tail or t.shape[0] not in (1, num_experts):
                problems.append(f"adapter slot {i}: {f} is {tuple(t.shape)}, expected (1 or {num_experts}, {tail[0]}, {tail[1]})")
        if problems:
            continue
        if is_shared(lora["w1.lora_A"]) != is_shared(lora["w3.lora_A"]):
            problems.append(f"adapter slot {i}: w1.lora_A and w3.lora_A must both be shared or both per expert")
        if num_experts > 1 and any(is_shared(lora[f]) for f in ("w1.lora_B", "w3.lora_B", "w2.lora_A")):
            problems.append(f"adapter slot {i}: only w1/w3.lora_A and w2.lora_B may be shared")
    return problems


def mixed_refusals(
    hidden_states: torch.Tensor,
    weights: Sequence[torch.Tensor],
    adapters: Sequence[ExpertLoraFactors],
    *,
    top_k_weights: Optional[torch.Tensor] = None,
    layout: Optional[ExpertsLayout] = None,
) -> list[str]:
    """Every reason the mixed kernels would not compute this call exactly; [] if none."""
    reasons = []
    if holds_quantized(weights):
        reasons.append("the mixed kernels read bf16/fp16/fp32 base weights; the base is held quantized")
    if needs_autograd(hidden_states, top_k_weights, *(t for a in adapters for t in a.values())):
        reasons.append("mixed-adapter batches are for inference: the mixed kernels have no backward")
    for lora in adapters or [None]:
        reasons += [r for r in triton_refusals(hidden_states, weights, lora, top_k_weights=top_k_weights, layout=layout)
                    if r not in reasons]
    dtypes = {t.dtype for a in adapters for t in a.values()}
    if len(dtypes) > 1:
        reasons.append(f"the adapters' factors must share one dtype (the kernels read them through one pointer "
                       f"type), got {sorted(map(str, dtypes))}")
    return reasons


def triton_mixed_experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    adapters: Sequence[ExpertLoraFactors],
    token_slot: torch.Tensor,
    *,
    layout: Optional[ExpertsLayout] = None,
    refusals_checked: bool = False,
) -> torch.Tensor:
    """Base experts plus, for each token t, adapter `adapters[token_slot[t]]` (none where it is -1).

    Equal to running each token's adapter through `triton_experts_forward` on its tokens alone.
    Raises `TritonBackendError` under autograd (mixed batches are for inference) and wherever the
    single-adapter kernels would refuse one of the adapters (`mixed_refusals`).
    """
    if not refusals_checked:
        reasons = mixed_refusals(hidden_states, (gate_up_proj, down_proj), adapters, top_k_weights=top_k_weights,
                                 layout=layout)
        if reasons:
            raise TritonBackendError.from_reasons(reasons)
    num_tokens, top_k = top_k_index.shape
    num_experts, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2
    if token_slot.shape != (num_tokens,):
        raise ValueError(f"token_slot must give one slot per token, shape ({num_tokens},), got {tuple(token_slot.shape)}")
    if not adapters:
        raise ValueError("a mixed-adapter batch needs at least one adapter")
    problems = mixed_adapter_problems(adapters, num_experts, hidden, inter)
    if problems:
        raise ValueError("; ".join(problems))
    token_slot = _slots_on(token_slot, len(adapters), hidden_states.device)
    guard = torch.cuda.device(hidden_states.device) if hidden_states.is_cuda else contextlib.nullcontext()
    with guard:
        return _mixed_forward(hidden_states.contiguous(), top_k_index, top_k_weights, gate_up_proj, down_proj,
                              slot_table(adapters, hidden_states.device), token_slot)


def _slots_on(slots: torch.Tensor, num_slots: int, device: torch.device) -> torch.Tensor:
    """The slot indices as the kernels read them (int32 on `device`), range-checked while still on the
    host (the layers build them there); an index outside [-1, slots) would silently mean "none"."""
    if slots.device.type == "cpu" and slots.numel() and not (-1 <= int(slots.min()) and int(slots.max()) < num_slots):
        raise ValueError(f"slot indices must lie in [-1, {num_slots}) for {num_slots} adapter(s), got "
                         f"{int(slots.min())}..{int(slots.max())}")
    return slots.to(device=device, dtype=torch.int32, non_blocking=True).contiguous()


def _mixed_forward(x, top_k_index, top_k_weights, gate_up_proj, down_proj, slots: SlotTable, token_slot) -> torch.Tensor:
    num_tokens, top_k = top_k_index.shape
    num_experts, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2
    num_pairs = num_tokens * top_k
    dtype, device = x.dtype, x.device
    if num_tokens == 0:
        return x.new_empty(0, hidden)
    precision = dot_precision(dtype)
    shape = shape_key(num_experts, hidden, inter)
    config_up = kernel_config("gate_up", num_tokens, device, shape)
    config_down = kernel_config("down", num_tokens, device, shape)
    routing_up = align_pairs_to_blocks(top_k_index, num_experts, config_up.block_m)
    routing_down = (routing_up if config_down.block_m == config_up.block_m
                    else align_pairs_to_blocks(top_k_index, num_experts, config_down.block_m))
    pair_weights = top_k_weights.reshape(-1).contiguous()
    block_r = slots.block_r
    common = dict(table_ptr=slots.table, factor_ptr=slots.factors[0], row_slot_ptr=token_slot,
                  num_slots=slots.table.shape[0], TOP_K=top_k, BLOCK_R=block_r, DOT_PRECISION=precision)

    token_a = pair_a = None
    if slots.any_shared_a:
        token_a = torch.empty(num_tokens, 2 * block_r, dtype=dtype, device=device)
        _shrink(x, token_a, None, config_up, common, a_column=GATE_A, two=True, serves_shared=1, x_row_div=1)
    if slots.any_expert_a:
        pair_a = torch.empty(num_pairs, 2 * block_r, dtype=dtype, device=device)
        _shrink(x, pair_a, routing_up, config_up, common, a_column=GATE_A, two=True, serves_shared=0, x_row_div=top_k)
    token_a = token_a if token_a is not None else pair_a  # a missing one is never read (masked)
    pair_a = pair_a if pair_a is not None else token_a

    h = torch.empty(num_pairs, inter, dtype=dtype, device=device)
    _mixed_gemm(ExpertGemm(x, gate_up_proj, h, routing_up, config_up, precision, x_row_div=top_k, gated=True),
                slots, common, token_a, pair_a)
    a_down = torch.empty(num_pairs, block_r, dtype=dtype, device=device)
    _shrink(h, a_down, routing_down, config_down, common, a_column=DOWN_A, two=False, serves_shared=-1, x_row_div=1)
    out = torch.empty(num_pairs, hidden, dtype=dtype, device=device)
    _mixed_gemm(ExpertGemm(h, down_proj, out, routing_down, config_down, precision, pair_weights=pair_weights),
                slots, common, a_down, a_down)
    if not slots.any_shared_b:
        return out.view(num_tokens, top_k, hidden).sum(dim=1)
    y = torch.empty(num_tokens, hidden, dtype=dtype, device=device)
    block_m, block_n = (16, 32) if device.type != "cuda" else (16, 128)
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(hidden, block_n))
    launch_fitting(
        _mixed_combine_kernel, grid, (top_k, block_m, block_n, block_r, precision), DEFAULT_STAGES,
        out, a_down, pair_weights, y, slots.table, slots.scaling, slots.factors[0], token_slot,
        num_tokens, hidden, slots.table.shape[0], out.stride(0), a_down.stride(0), y.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, DOT_PRECISION=precision,
    )
    return y


def _shrink(x: torch.Tensor, out: torch.Tensor, routing: Optional[BlockRouting], config: KernelConfig, common: dict,
            *, a_column: int, two: bool, serves_shared: int, x_row_div: int) -> None:
    pair_rows = routing is not None
    block_m = config.block_m if pair_rows else 16
    if pair_rows:
        grid, sorted_ids, expert_of_block, padded = (
            (routing.max_blocks,), routing.sorted_pair_ids, routing.expert_of_block, routing.num_padded_rows)
        num_rows = routing.num_pairs
    else:
        num_rows = x.shape[0]
        grid = (triton.cdiv(num_rows, block_m),)
        sorted_ids = expert_of_block = padded = common["row_slot_ptr"]  # not read for token rows
    launch_fitting(
        _mixed_shrink_kernel, grid, (two, pair_rows, block_m, config, common["BLOCK_R"], common["DOT_PRECISION"]),
        DEFAULT_STAGES,
        x, out, common["table_ptr"], common["factor_ptr"], common["row_slot_ptr"], sorted_ids, expert_of_block, padded,
        num_rows, x.shape[1], common["num_slots"], x.stride(0), out.stride(0),
        A_COLUMN=a_column, TWO_FACTORS=two, PAIR_ROWS=pair_rows, SERVES_SHARED=serves_shared, X_ROW_DIV=x_row_div,
        TOP_K=common["TOP_K"], BLOCK_M=block_m, BLOCK_K=config.block_k, BLOCK_R=common["BLOCK_R"],
        DOT_PRECISION=common["DOT_PRECISION"], num_warps=config.num_warps,
    )


def _mixed_gemm(gemm: ExpertGemm, slots: SlotTable, common: dict, token_lora: torch.Tensor, pair_lora: torch.Tensor) -> None:
    """`gemm`'s base GEMM (the single-adapter kernels' problem description; its `expansion` and `shrink`
    unused) with each row's slot's expansion from `token_lora` / `pair_lora`."""
    x, weight, out, routing, config = gemm.x, gemm.weight, gemm.out, gemm.routing, gemm.config
    n = weight.shape[1] // 2 if gemm.gated else weight.shape[1]
    grid = (routing.max_blocks * triton.cdiv(n, config.block_n),)
    launch_fitting(
        _mixed_expert_gemm_kernel, grid, (gemm.gated, common["BLOCK_R"], config, gemm.precision), config.num_stages,
        x, weight, out, gemm.pair_weights if gemm.pair_weights is not None else out, token_lora, pair_lora,
        common["table_ptr"], slots.scaling, common["factor_ptr"], common["row_slot_ptr"],
        routing.sorted_pair_ids, routing.expert_of_block, routing.num_padded_rows,
        n, weight.shape[2], routing.num_pairs, common["num_slots"],
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0),
        token_lora.stride(0),
        X_ROW_DIV=gemm.x_row_div, TOP_K=common["TOP_K"], GATED=gemm.gated, MUL_WEIGHT=gemm.pair_weights is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_R=common["BLOCK_R"],
        GROUP_M=config.group_m, DOT_PRECISION=gemm.precision, num_warps=config.num_warps,
    )


# ---- attention (and any other linear) LoRA of a mixed batch ----------------------------------------

@triton.jit
def _mixed_linear_lora_kernel(
    x_ptr,  # (M, K) input rows, contiguous along K
    base_ptr,  # (M, N) the base layer's output
    out_ptr,  # (M, N) base + each row's delta, strided like base
    table_ptr,  # (slots, 3) int64: lora_A (r, K) address, lora_B (N, r) address, rank
    scaling_ptr,
    factor_ptr,
    row_slot_ptr,  # (M,) int32, -1 for none
    M,
    N,
    K,
    num_slots,
    stride_xm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rows = tl.where(m_ok, offs_m, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    slot = tl.load(row_slot_ptr + rows, mask=m_ok, other=-1)
    delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, num_slots):
        mine = m_ok & (slot == s)
        if tl.sum(mine.to(tl.int32), axis=0) > 0:
            rank = tl.load(table_ptr + s * 3 + 2)
            r_ok = offs_r < rank
            a_ptrs = tl.load(table_ptr + s * 3).to(tl.pointer_type(factor_ptr.dtype.element_ty)) \
                + offs_r[None, :] * K + offs_k[:, None]  # (BK, BR)
            x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
            xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = offs_k < K - k0
                xt = tl.load(x_ptrs, mask=mine[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                # PEFT's LoRA runs in the factors' dtype: the input is cast to it
                xa += tl.dot(xt.to(at.dtype), at, input_precision=DOT_PRECISION)
                x_ptrs += BLOCK_K
                a_ptrs += BLOCK_K
            b_ptrs = tl.load(table_ptr + s * 3 + 1).to(tl.pointer_type(factor_ptr.dtype.element_ty)) \
                + offs_n[None, :] * rank + offs_r[:, None]  # (BR, BN)
            bt = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            delta += tl.load(scaling_ptr + s) * tl.dot(xa.to(bt.dtype), bt, input_precision=DOT_PRECISION)
    offsets = rows[:, None] * stride_om + offs_n[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    out = tl.load(base_ptr + offsets, mask=o_mask, other=0.0).to(tl.float32) + delta
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=o_mask)


def mixed_linear_lora_refusals(x: torch.Tensor, result: torch.Tensor, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """Why `mixed_linear_lora` would not compute PEFT's LoRA delta exactly here; [] if it would."""
    from .triton_experts import interpreter_active

    tensors = [x, result, *(t for pair in factors for t in pair)]
    reasons = []
    if needs_autograd(*tensors):
        reasons.append("mixed-adapter batches are for inference: the mixed kernels have no backward")
    if x.device.type != "cuda" and not interpreter_active():
        reasons.append(f"the kernels need a CUDA device, the input is on {x.device}")
    if any(t.device != x.device for t in tensors):
        reasons.append("the input, the base output and the factors are not on one device")
    if not result.is_contiguous():
        reasons.append(f"the base output {tuple(result.shape)} is not contiguous")
    dtypes = {t.dtype for pair in factors for t in pair}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float16, torch.bfloat16}:
        reasons.append(f"the adapters' factors must share one float32/float16/bfloat16 dtype, got {sorted(map(str, dtypes))}")
    if interpreter_active() and torch.bfloat16 in {x.dtype, result.dtype, *dtypes}:
        reasons.append("the interpreter does not run bfloat16")
    return reasons


def mixed_linear_lora(
    result: torch.Tensor,
    x: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scalings: Sequence[float],
    row_slot: torch.Tensor,
) -> torch.Tensor:
    """result[m] + scalings[s] * B_s A_s x[m] for s = row_slot[m] (nothing where -1), in one launch.

    `factors[s]` = (lora_A (r, K), lora_B (N, r)) of slot s; `x` (..., K), `result` (..., N) the base
    output, left untouched (a new tensor is returned). The product runs in the factors' dtype (x cast
    to it, as PEFT's LoRA does) and is added with one rounding. Callers check
    `mixed_linear_lora_refusals` first.
    """
    k, n = x.shape[-1], result.shape[-1]
    x2 = x.reshape(-1, k)
    base2 = result.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if base2.stride(-1) != 1 or base2.shape[0] != x2.shape[0] or row_slot.shape != (x2.shape[0],):
        raise ValueError(f"mixed LoRA linear: x {tuple(x.shape)} and result {tuple(result.shape)} must have the same "
                         f"rows (contiguous), and row_slot one per row ({x2.shape[0]},), got {tuple(row_slot.shape)}")
    row_slot = _slots_on(row_slot, len(factors), x.device)
    out2 = torch.empty_like(base2)
    for i, (a, b) in enumerate(factors):
        if a.shape[1] != k or b.shape != (n, a.shape[0]):
            raise ValueError(f"adapter slot {i}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                             f"({n}, r) x (r, {k})")
    kept = [t.contiguous() for pair in factors for t in pair]
    rows = [[kept[2 * i].data_ptr(), kept[2 * i + 1].data_ptr(), factors[i][0].shape[0]] for i in range(len(factors))]
    table, scaling = _cached_table(rows, scalings, x.device)
    block_r = max(16, triton.next_power_of_2(max(r[2] for r in rows)))
    interpreted = x.device.type != "cuda"
    block_m, block_n, block_k = (16, 32, 32) if interpreted else (16, 64, 128)
    grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(n, block_n))
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        precision = dot_precision(kept[0].dtype)
        launch_fitting(
            _mixed_linear_lora_kernel, grid, (block_m, block_n, block_k, block_r, precision), DEFAULT_STAGES,
            x2, base2, out2, table, scaling, kept[0], row_slot, x2.shape[0], n, k, len(factors), x2.stride(0),
            out2.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, DOT_PRECISION=precision,
        )
    return out2.view(result.shape)
