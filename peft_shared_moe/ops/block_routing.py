"""Token-expert pairs sorted by expert and padded to the GEMM block size, for the Triton kernels.

Each block of BLOCK_M rows belongs to one expert, so a kernel program reads one expert's weights.
Worked example, BLOCK_M = 4, E = 3, top_k_index = [[2, 0], [0, 1], [0, 2]] (flat pairs 0..5)::

    tokens_per_expert = [3, 1, 2]  ->  padded to [4, 4, 4], block starts [0, 4, 8]
    sorted_pair_ids   = [1, 2, 4, S,   3, S, S, S,   0, 5, S, S]     (S = 6 marks padding)
    expert_of_block   = [0, 1, 2]  (then E for blocks past the end)
    num_padded_rows   = [12]

All sizes that depend on the routing stay on the device: the buffers are allocated for the worst
case (`max_blocks`), and programs past `num_padded_rows` return at once. No host synchronisation,
so the path can be captured in a CUDA graph.

Three implementations with one result (pairs of one expert keep their order, so reductions over an
expert's blocks are deterministic): `_align_torch`, a few dozen torch ops, the reference; for
decode-sized batches (S <= SMALL_PAIRS) one single-program Triton kernel; above that three Triton
kernels over chunks of pairs (count per chunk, offsets, place), since each torch launch costs host
time that a training step or a large prefill pays once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class BlockRouting:
    num_pairs: int  # S = tokens * top_k
    sorted_pair_ids: torch.Tensor  # (max_blocks * block_m,) int32, pair id or S for padding
    expert_of_block: torch.Tensor  # (max_blocks,) int32, E past the last used block
    num_padded_rows: torch.Tensor  # (1,) int32

    @property
    def max_blocks(self) -> int:
        return self.expert_of_block.numel()


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst case over routings: each used expert wastes less than one block on padding."""
    return -(-num_pairs // block_m) + min(num_experts, num_pairs)


# One program ranks every pair against the earlier ones (S^2 / 2 compares): cheap for decode only.
SMALL_PAIRS = 128


def align_pairs_to_blocks(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> BlockRouting:
    if top_k_index.numel() <= SMALL_PAIRS:
        return _align_small(top_k_index, num_experts, block_m)
    return _align_large(top_k_index, num_experts, block_m)


def _align_torch(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> BlockRouting:
    device = top_k_index.device
    flat_experts = top_k_index.reshape(-1).long()  # (S,)
    num_pairs = flat_experts.numel()

    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat_experts, torch.ones_like(flat_experts))  # (E,)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)  # (E,)
    padded_start = padded_end - padded
    group_start = torch.cumsum(counts, 0) - counts

    sorted_experts, pair_order = torch.sort(flat_experts.int(), stable=True)  # (S,), int32 keys sort faster
    sorted_experts = sorted_experts.long()
    rank_in_group = torch.arange(num_pairs, device=device) - group_start[sorted_experts]
    destination = padded_start[sorted_experts] + rank_in_group  # (S,)

    blocks = max_blocks(num_pairs, num_experts, block_m)
    sorted_pair_ids = torch.full((blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, destination, pair_order.to(torch.int32))
    block_start = torch.arange(blocks, device=device) * block_m
    expert_of_block = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)
    return BlockRouting(
        num_pairs=num_pairs,
        sorted_pair_ids=sorted_pair_ids,
        expert_of_block=expert_of_block,
        num_padded_rows=padded_end[-1:].to(torch.int32),
    )


@triton.jit
def _align_small_kernel(
    expert_ids_ptr,  # (S,) expert of each flat pair
    sorted_pair_ids_ptr,  # (num_blocks * BLOCK_M,) out
    expert_of_block_ptr,  # (num_blocks,) out
    num_padded_rows_ptr,  # (1,) out
    padded_start_ptr,  # (E,) scratch
    num_pairs,
    num_experts,
    num_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,  # >= S, power of two
    BLOCK_E: tl.constexpr,  # > E, power of two (bin E collects the masked lanes)
    BLOCK_B: tl.constexpr,  # >= num_blocks, power of two
    CHUNK: tl.constexpr,
):
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_pairs
    expert = tl.load(expert_ids_ptr + offs_s, mask=s_ok, other=num_experts).to(tl.int32)
    counts = tl.histogram(expert, BLOCK_E)  # (BLOCK_E,)
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.where(offs_e < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    tl.store(padded_start_ptr + offs_e, padded_end - padded, mask=offs_e < num_experts)
    tl.store(num_padded_rows_ptr, tl.sum(padded, axis=0))

    # expert of each block: how many experts end at or before the block's first row
    offs_b = tl.arange(0, BLOCK_B)
    ends_before = (padded_end[None, :] <= (offs_b * BLOCK_M)[:, None]) & (offs_e < num_experts)[None, :]
    tl.store(expert_of_block_ptr + offs_b, tl.sum(ends_before.to(tl.int32), axis=1), mask=offs_b < num_blocks)

    # padding everywhere first, then each pair at its place
    for start in range(0, num_blocks * BLOCK_M, BLOCK_S):
        rows = start + offs_s
        tl.store(sorted_pair_ids_ptr + rows, tl.zeros((BLOCK_S,), tl.int32) + num_pairs, mask=rows < num_blocks * BLOCK_M)
    # rank of each pair among the earlier pairs of its expert (a stable sort)
    rank = tl.zeros((BLOCK_S,), tl.int32)
    offs_c = tl.arange(0, CHUNK)
    for start in range(0, num_pairs, CHUNK):
        other = tl.load(expert_ids_ptr + start + offs_c, mask=start + offs_c < num_pairs, other=-1).to(tl.int32)
        same = (expert[:, None] == other[None, :]) & ((start + offs_c)[None, :] < offs_s[:, None])
        rank += tl.sum(same.to(tl.int32), axis=1)
    tl.debug_barrier()  # the scratch and the padding writes above are visible from here on
    start_of_expert = tl.load(padded_start_ptr + expert, mask=s_ok, other=0)
    tl.store(sorted_pair_ids_ptr + start_of_expert + rank, offs_s, mask=s_ok)


def _align_small(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> BlockRouting:
    num_pairs = top_k_index.numel()
    device = top_k_index.device
    blocks = max_blocks(num_pairs, num_experts, block_m)
    sorted_pair_ids = torch.empty(blocks * block_m, dtype=torch.int32, device=device)
    expert_of_block = torch.empty(blocks, dtype=torch.int32, device=device)
    num_padded_rows = torch.empty(1, dtype=torch.int32, device=device)
    scratch = torch.empty(num_experts, dtype=torch.int32, device=device)
    _align_small_kernel[(1,)](
        top_k_index.reshape(-1), sorted_pair_ids, expert_of_block, num_padded_rows, scratch,
        num_pairs, num_experts, blocks,
        BLOCK_M=block_m,
        BLOCK_S=max(16, triton.next_power_of_2(num_pairs)),
        BLOCK_E=triton.next_power_of_2(num_experts + 1),
        BLOCK_B=max(16, triton.next_power_of_2(blocks)),
        CHUNK=64,
        num_warps=8,
    )
    return BlockRouting(num_pairs, sorted_pair_ids, expert_of_block, num_padded_rows)


# Pairs per program of the large-batch kernels; a chunk is sorted in registers (keys expert * CHUNK + index).
ALIGN_CHUNK = 1024


@triton.jit
def _chunk_counts_kernel(expert_ids_ptr, counts_ptr, num_pairs, num_experts, CHUNK: tl.constexpr,
                         BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    expert = tl.load(expert_ids_ptr + offs, mask=offs < num_pairs, other=num_experts).to(tl.int32)
    tl.store(counts_ptr + chunk * BLOCK_E + tl.arange(0, BLOCK_E), tl.histogram(expert, BLOCK_E))


@triton.jit
def _chunk_offsets_kernel(
    counts_ptr,  # (chunks, BLOCK_E) pairs of each expert in each chunk
    base_ptr,  # (chunks, BLOCK_E) out: where a chunk's pairs of an expert start, less their offset in the chunk's sort
    expert_of_block_ptr, num_padded_rows_ptr,
    num_chunks, num_experts, num_blocks,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < num_experts
    total = tl.zeros((BLOCK_E,), tl.int32)
    for chunk in range(num_chunks):
        total += tl.load(counts_ptr + chunk * BLOCK_E + offs_e)
    total = tl.where(e_ok, total, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    tl.store(num_padded_rows_ptr, tl.sum(padded, axis=0))
    running = padded_end - padded  # the next free row of each expert
    for chunk in range(num_chunks):
        counts = tl.where(e_ok, tl.load(counts_ptr + chunk * BLOCK_E + offs_e), 0)
        tl.store(base_ptr + chunk * BLOCK_E + offs_e, running - (tl.cumsum(counts, axis=0) - counts))
        running += counts
    for first in range(0, num_blocks, BLOCK_B):  # expert of a block: experts ending at or before its first row
        offs_b = first + tl.arange(0, BLOCK_B)
        ends_before = (padded_end[None, :] <= (offs_b * BLOCK_M)[:, None]) & e_ok[None, :]
        tl.store(expert_of_block_ptr + offs_b, tl.sum(ends_before.to(tl.int32), axis=1), mask=offs_b < num_blocks)


@triton.jit
def _place_pairs_kernel(expert_ids_ptr, base_ptr, sorted_pair_ids_ptr, num_pairs, num_experts, CHUNK: tl.constexpr,
                        BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    local = tl.arange(0, CHUNK)
    offs = chunk * CHUNK + local
    expert = tl.load(expert_ids_ptr + offs, mask=offs < num_pairs, other=num_experts).to(tl.int32)
    keys = tl.sort(expert * CHUNK + local)  # by expert, then by pair: a stable sort of the chunk
    expert = keys // CHUNK
    routed = expert < num_experts
    row = tl.load(base_ptr + chunk * BLOCK_E + expert, mask=routed, other=0) + local
    tl.store(sorted_pair_ids_ptr + row, chunk * CHUNK + keys % CHUNK, mask=routed)


def _align_large(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> BlockRouting:
    num_pairs = top_k_index.numel()
    device = top_k_index.device
    flat = top_k_index.reshape(-1)
    chunks = triton.cdiv(num_pairs, ALIGN_CHUNK)
    block_e = triton.next_power_of_2(num_experts + 1)  # bin E collects the masked lanes
    blocks = max_blocks(num_pairs, num_experts, block_m)
    counts = torch.empty(chunks, block_e, dtype=torch.int32, device=device)
    base = torch.empty_like(counts)
    sorted_pair_ids = torch.full((blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    expert_of_block = torch.empty(blocks, dtype=torch.int32, device=device)
    num_padded_rows = torch.empty(1, dtype=torch.int32, device=device)
    _chunk_counts_kernel[(chunks,)](flat, counts, num_pairs, num_experts, CHUNK=ALIGN_CHUNK, BLOCK_E=block_e)
    _chunk_offsets_kernel[(1,)](counts, base, expert_of_block, num_padded_rows, chunks, num_experts, blocks,
                                BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_B=max(16, 2**16 // block_e), num_warps=8)
    _place_pairs_kernel[(chunks,)](flat, base, sorted_pair_ids, num_pairs, num_experts, CHUNK=ALIGN_CHUNK,
                                   BLOCK_E=block_e, num_warps=8)
    return BlockRouting(num_pairs, sorted_pair_ids, expert_of_block, num_padded_rows)
