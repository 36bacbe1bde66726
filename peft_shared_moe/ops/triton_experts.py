"""Triton fused experts: base experts and shared-outer / per-expert LoRA (training: triton_train.py).

Layers of one op, as in the Triton tutorials and vLLM's fused_moe:
`_grouped_gemm_kernel` (one jit kernel) -> `launch(ExpertGemm)` (one typed description of the problem:
strides, grid, shape checks) ->
`triton_experts_forward` (the passes of one MoE layer) -> registered as the "triton" backend.

The passes for one layer (shared-outer adapter):
1. `a = x @ [A_gate; A_up]^T`                       once per token, (T, 2r)   (torch matmul)
2. gate_up kernel: per expert block, x W_gu^T + s a B_gu^T, epilogue SiLU(gate) * up -> h (S, I)
3. down kernel: per expert block, w * h W_down^T -> (S, H), and on the n = 0 programs the fused
   shrink w * h A_down^T -> (S, r)
4. per token: y = sum_k (S, H) rows + s (sum_k (S, r) rows) B_down^T   (B_down once per token)
Per-expert A or B adds one small grouped pass each (the shrink for A, the down expansion for B).
The pure-torch reference beside these kernels is `torch_experts.experts_forward`.

Exact or refused: `triton_experts_forward` raises `TritonBackendError` where the kernels would compute
something else (a base needing gradients, another gate or layout, no CUDA device, ...; `triton_refusals`), float32
products follow torch's matmul precision (`dot_precision`), and the adapter is packed from the live
factors on every call (`pack_lora`), never from a cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from ..factors import EXPERT_FACTORS
from .block_routing import BlockRouting, align_pairs_to_blocks
from .experts_layout import ExpertsLayout, _is_silu
from .kernel_configs import KernelConfig, kernel_config, shape_key
from .quantized import QuantizedExpertWeights, holds_quantized
from .torch_experts import ExpertLoraFactors, is_shared
from .triton_support import TritonBackendError


@triton.jit
def _tile_of_program(num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column tile) of this program in a 1D grid, GROUP_M row blocks at a time: the
    programs running together share their row blocks and their experts' weight tiles in L2, instead
    of every row block being read from memory once per column tile."""
    pid = tl.program_id(0)
    num_pid_m = tl.num_programs(0) // num_pid_n
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_size, (pid % in_group) // group_size


@triton.jit
def _block_pairs(block, sorted_pair_ids_ptr, expert_of_block_ptr, num_pairs, BLOCK_M: tl.constexpr):
    """The expert of row block `block` and its BLOCK_M pair ids; padding rows get pair 0 and row_ok False."""
    expert = tl.load(expert_of_block_ptr + block).to(tl.int64)
    pair = tl.load(sorted_pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < num_pairs
    return expert, tl.where(row_ok, pair, 0).to(tl.int64), row_ok


@triton.jit
def _expert_gemm(x_ptrs, w_ptrs, row_ok, n_ok, offs_k, K, stride_xk, stride_wk, up_offset,
                 GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """(BM, BN) tiles of gathered rows times one expert's weight: the main loop of every experts GEMM.
    With GATED, a second tile `up_offset` further along the weight's rows (the up half) shares the row loads."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, b.to(a.dtype), input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(w_ptrs + up_offset, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_up += tl.dot(a, b_up.to(a.dtype), input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc, acc_up


@triton.jit
def _lora_dot(lora_in_ptr, lora_row, b_ptr, expert, offs_n, row_ok, n_ok, R, stride_lm, stride_lk,
              stride_be, stride_bn, stride_bk, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The expansion of a block: rank-r activations lora_in[lora_row] (BM, R) times expert `expert`'s
    (N, R) factor b, an (R, BN) tile of it at columns offs_n (cast to the activations' dtype as loaded)."""
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    l_ptrs = lora_in_ptr + lora_row[:, None] * stride_lm + offs_r[None, :] * stride_lk
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_bk
    la = tl.load(l_ptrs, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    lb = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    return tl.dot(la, lb.to(la.dtype), input_precision=DOT_PRECISION)


@triton.jit
def _add_expansion(acc, acc_up, lora_in_ptr, lora_b_ptr, lora_b_up_ptr, pair, expert, offs_n, row_ok, n_ok, R, scaling,
                   stride_lm, stride_lk, stride_be, stride_bn, stride_bk, LORA_ROW_DIV: tl.constexpr,
                   GATED: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`LoraExpansion` on a block's accumulators: + s lora_in[p // LORA_ROW_DIV] B[e]^T, and when gated
    the up half's + s lora_in[.., R:] B_up[e]^T."""
    lora_row = pair // LORA_ROW_DIV
    acc += scaling * _lora_dot(lora_in_ptr, lora_row, lora_b_ptr, expert, offs_n, row_ok, n_ok, R, stride_lm,
                               stride_lk, stride_be, stride_bn, stride_bk, BLOCK_R, DOT_PRECISION)
    if GATED:
        acc_up += scaling * _lora_dot(lora_in_ptr + R * stride_lk, lora_row, lora_b_up_ptr, expert, offs_n, row_ok, n_ok,
                                      R, stride_lm, stride_lk, stride_be, stride_bn, stride_bk, BLOCK_R, DOT_PRECISION)
    return acc, acc_up


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    x_ptr,  # input rows; row of pair p is p // X_ROW_DIV
    w_ptr,  # (E, N_w, K) expert weights
    out_ptr,  # (S, N) output rows, indexed by pair id
    lora_in_ptr,  # (rows, R or 2R) rank-r activations; row of pair p is p // LORA_ROW_DIV
    lora_b_ptr,  # (E, N_w, R) expansion factor (the gate half's when GATED)
    lora_b_up_ptr,  # (E, N, R) the up half's expansion factor when GATED, with lora_b's strides
    shrink_w_ptr,  # (E, R, K) fused shrink factor
    shrink_out_ptr,  # (S, R)
    pair_weight_ptr,  # (S,) routing weight of each pair
    pre_ptr,  # (S, 2N) [gate; up] before the SiLU, written when STORE_PRE
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
    stride_pm, stride_pn,
    # meta
    X_ROW_DIV: tl.constexpr,
    LORA_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    HAS_EXPAND: tl.constexpr,
    HAS_SHRINK: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32": float32 products follow torch's matmul precision
):
    pid_m, pid_n = _tile_of_program(tl.cdiv(N, BLOCK_N) + HAS_SHRINK, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_rows_ptr):
        return
    expert, pair, row_ok = _block_pairs(pid_m, sorted_pair_ids_ptr, expert_of_block_ptr, num_pairs, BLOCK_M)
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
    if is_shrink_program:  # the same main loop, over the shrink factor's R columns
        s_ptrs = shrink_w_ptr + expert * stride_se + offs_r[None, :] * stride_sr + offs_k[:, None] * stride_sk
        acc_r, _unused = _expert_gemm(x_ptrs, s_ptrs, row_ok, r_ok, offs_k, K, stride_xk, stride_sk, 0,
                                      False, BLOCK_M, BLOCK_R, BLOCK_K, DOT_PRECISION)
        if MUL_WEIGHT:
            acc_r = acc_r * weight[:, None]
        t_ptrs = shrink_out_ptr + pair[:, None] * stride_tm + offs_r[None, :] * stride_tr
        tl.store(t_ptrs, acc_r.to(shrink_out_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])
    else:
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BK, BN)
        acc, acc_up = _expert_gemm(x_ptrs, w_ptrs, row_ok, n_ok, offs_k, K, stride_xk, stride_wk, N * stride_wn,
                                   GATED, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        if HAS_EXPAND:
            acc, acc_up = _add_expansion(acc, acc_up, lora_in_ptr, lora_b_ptr, lora_b_up_ptr, pair, expert, offs_n,
                                         row_ok, n_ok, R, scaling, stride_lm, stride_lk, stride_be, stride_bn,
                                         stride_bk, LORA_ROW_DIV, GATED, BLOCK_R, DOT_PRECISION)

        if STORE_PRE:  # the training forward keeps [gate; up] before the SiLU for its backward
            pre_ptrs = pre_ptr + pair[:, None] * stride_pm + offs_n[None, :] * stride_pn
            tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
            tl.store(pre_ptrs + N * stride_pn, acc_up.to(pre_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # SiLU(gate) * up
        if MUL_WEIGHT:
            acc = acc * weight[:, None]
        out_ptrs = out_ptr + pair[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


_STAGES_THAT_FIT: dict[tuple, int] = {}


@dataclass(slots=True)
class LoraExpansion:
    """`+ scaling * lora_in[p // row_div] @ b[e]^T` on each pair p of expert e. Gated, `b` is the gate
    half's factor and `b_up` the up half's (two tensors, so nothing is concatenated per call), read
    from lora_in's first and second r columns. Factors are cast to the activation dtype as loaded."""

    lora_in: torch.Tensor  # (rows, r), or (rows, 2r) when gated
    b: torch.Tensor  # (E, N, r)
    scaling: float = 1.0
    row_div: int = 1
    b_up: Optional[torch.Tensor] = None  # (E, N, r), strided like b


@dataclass(slots=True)
class LoraShrink:
    """An extra column of programs writes `w_p * x[p] @ a[e]^T` (w_p: the GEMM's routing weight, if any)."""

    a: torch.Tensor  # (E, r, K)
    out: torch.Tensor  # (S, r)


@dataclass(slots=True)
class ExpertGemm:
    """One grouped GEMM over a routing's expert blocks, the one problem every experts kernel launch
    describes: for each pair p of expert e,
    out[p] = w_p * act(x[p // x_row_div] @ weight[e]^T + expansion), act = SiLU(gate) * up when gated.
    """

    x: torch.Tensor  # (rows, K)
    weight: torch.Tensor  # (E, N, K), or (E, 2N, K) [gate; up] when gated; or a QuantizedExpertWeights
    out: torch.Tensor  # (S, N)
    routing: BlockRouting
    config: KernelConfig
    precision: str  # tl.dot's input precision (`dot_precision`)
    x_row_div: int = 1
    gated: bool = False
    expansion: Optional[LoraExpansion] = None
    shrink: Optional[LoraShrink] = None
    pair_weights: Optional[torch.Tensor] = None  # (S,)
    store_pre: Optional[torch.Tensor] = None  # (S, 2N): [gate; up] before the SiLU (the training forward)


def launch(gemm: ExpertGemm) -> torch.Tensor:
    """Run `gemm` in `_grouped_gemm_kernel` (a weight held quantized: in `triton_quantized`'s kernel, which
    has no fused shrink or kept pre-activation); checks its shapes, returns `gemm.out`."""
    x, weight, out, routing, config = gemm.x, gemm.weight, gemm.out, gemm.routing, gemm.config
    expand, shrink, gated = gemm.expansion, gemm.shrink, gemm.gated
    num_experts, n_w, k = weight.shape
    n = n_w // 2 if gated else n_w
    if x.shape[-1] != k or out.shape != (routing.num_pairs, n):
        raise ValueError(f"grouped GEMM shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, out {tuple(out.shape)}")
    rank = 0
    quantized = isinstance(weight, QuantizedExpertWeights)
    # Unused pointers get stand-ins (never read: the flags compile those loads away).
    stand_in = x[None] if quantized else weight  # a 3-D tensor
    lora_in, lora_b, lora_row_div, scaling = (
        (expand.lora_in, expand.b, expand.row_div, expand.scaling) if expand is not None else (out, stand_in, 1, 0.0))
    shrink_w, shrink_out = (shrink.a, shrink.out) if shrink is not None else (stand_in, out)
    lora_b_up = lora_b
    if expand is not None:
        rank = lora_b.shape[-1]
        if gated:
            lora_b_up = expand.b_up
            if lora_b_up is None or lora_b_up.shape != lora_b.shape or lora_b_up.stride() != lora_b.stride():
                raise ValueError(f"gated expansion needs an up factor shaped and strided like {tuple(lora_b.shape)}")
    if shrink is not None:
        rank = shrink_w.shape[1]
    block_r = max(16, triton.next_power_of_2(max(rank, 1)))
    if quantized:  # the same problem, its weight tiles dequantized in registers
        from .triton_quantized import launch_quantized

        launch_quantized(gemm, lora_in, lora_b, lora_b_up, rank, block_r)
        return out
    store_pre = gemm.store_pre
    if store_pre is not None and (not gated or store_pre.shape != (routing.num_pairs, 2 * n)):
        raise ValueError(f"store_pre must be (S, 2N) = ({routing.num_pairs}, {2 * n}) of a gated GEMM, got {tuple(store_pre.shape)}")
    pre = store_pre if store_pre is not None else out
    pair_weights = gemm.pair_weights
    grid = (routing.max_blocks * (triton.cdiv(n, config.block_n) + (shrink is not None)),)
    flags = (gated, expand is not None, shrink is not None, store_pre is not None, block_r, config, gemm.precision)
    launch_fitting(
        _grouped_gemm_kernel, grid, flags, config.num_stages,
        x, weight, out, lora_in, lora_b, lora_b_up, shrink_w, shrink_out,
        pair_weights if pair_weights is not None else out, pre,
        routing.sorted_pair_ids, routing.expert_of_block, routing.num_padded_rows,
        n, k, rank, routing.num_pairs, float(scaling),
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        out.stride(0), out.stride(1),
        lora_in.stride(0), lora_in.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        shrink_w.stride(0), shrink_w.stride(1), shrink_w.stride(2),
        shrink_out.stride(0), shrink_out.stride(1),
        pre.stride(0), pre.stride(1),
        X_ROW_DIV=gemm.x_row_div,
        LORA_ROW_DIV=lora_row_div,
        GATED=gated,
        HAS_EXPAND=expand is not None,
        HAS_SHRINK=shrink is not None,
        MUL_WEIGHT=pair_weights is not None,
        STORE_PRE=store_pre is not None,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        BLOCK_R=block_r,
        GROUP_M=config.group_m,
        DOT_PRECISION=gemm.precision,
        num_warps=config.num_warps,
    )
    return out


def launch_fitting(kernel, grid: tuple, key: tuple, num_stages: int, *args, **meta) -> None:
    """`kernel[grid](*args, **meta, num_stages=...)`: a tuned tile can overflow shared memory once a
    large rank adds its tiles, so it retries with fewer pipeline stages and remembers what fits (per
    kernel and `key`, which must hold everything that sizes the tiles)."""
    key = (kernel, key)
    stages = _STAGES_THAT_FIT.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, **meta, num_stages=stages)
            break
        except triton.runtime.errors.OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
    _STAGES_THAT_FIT[key] = stages


# The activation dtypes the kernels are written and tested for.
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
# The devices `backend="auto"` sends to the kernels. The interpreter runs them on the CPU as well, but
# one program after another: there only an explicit `backend="triton"` (the tests) uses it.
AUTO_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


# Whether triton.jit built the kernels for the interpreter (TRITON_INTERPRET=1 when this module was
# imported), which runs them on CPU tensors; the environment variable read later could disagree.
# (Not an import of the interpreter's class: that module needs numpy, which a GPU install may lack.)
_INTERPRETED = not isinstance(_grouped_gemm_kernel, JITFunction)


def interpreter_active() -> bool:
    """The kernels run in the Triton interpreter, so CPU tensors are fine."""
    return _INTERPRETED


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision for activations of `dtype`: what torch's own float32 CUDA matmuls use.

    float32 gets "ieee" (full precision, torch's default "highest") unless torch allows TF32 for
    float32 matmuls (`torch.set_float32_matmul_precision("high")` or "medium", or
    `torch.backends.cuda.matmul.fp32_precision = "tf32"`). 16-bit activations get "tf32", triton's
    default, which does not touch 16-bit operands: their compiled kernels are unchanged.
    """
    if dtype != torch.float32:
        return "tf32"
    # torch >= 2.9 keeps the setting here; the legacy setter writes it too ("none": not set this way).
    setting = getattr(getattr(torch.backends.cuda, "matmul", None), "fp32_precision", "none")
    if setting == "none":
        try:
            setting = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
        except RuntimeError:  # legacy and new API mixed: torch refuses to say, so take the exact one
            setting = "ieee"
    return "tf32" if setting == "tf32" else "ieee"


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device; a layer placed by a multi-GPU device_map may sit on another."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def needs_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def triton_refusals(
    hidden_states: torch.Tensor,
    weights: Sequence[torch.Tensor],
    lora: Optional[ExpertLoraFactors] = None,
    *,
    top_k_weights: Optional[torch.Tensor] = None,
    layout: Optional[ExpertsLayout] = None,
    act_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> list[str]:
    """Every reason the kernels would not compute this call exactly, each with what to do; [] if none.

    `weights` are the base (gate_up_proj, down_proj). The kernels implement one layout and the SiLU
    gate, need CUDA (or the interpreter), and compute in the activation dtype; where autograd is
    needed (triton_train.py) they train an adapter on a frozen base.
    """
    named = {"hidden_states": hidden_states, **dict(zip(("gate_up_proj", "down_proj"), weights))}
    if top_k_weights is not None:
        named["top_k_weights"] = top_k_weights
    if lora is not None:
        named.update((f, lora[f]) for f in EXPERT_FACTORS)
    reasons = []
    if holds_quantized(weights) and torch.compiler.is_compiling():
        reasons.append("the base is held quantized and this runs under torch.compile: the quantized kernels are "
                       "eager only (their weights are modules, not tensors a custom op takes); use backend='auto' "
                       "or 'torch'")
    if holds_quantized(weights) and not all(holds_quantized([w]) for w in weights):
        reasons.append("gate_up_proj and down_proj must both be held quantized, or neither")
    if needs_autograd(*named.values()):
        # the training kernels (triton_train.py) give the input's, the routing weights' and the factors' gradients
        base_grad = [n for n in ("gate_up_proj", "down_proj") if named[n].requires_grad]
        if base_grad:
            reasons.append(
                f"autograd is needed for the base weights ({', '.join(base_grad)} require grad) and the kernels' "
                "backward computes no base-weight gradient (frozen base only): use backend='auto' or 'torch'"
            )
        if lora is None:
            reasons.append("autograd is needed and the kernels' backward trains an adapter, none is given: "
                           "use backend='auto' or 'torch'")
    if layout is not None and not layout.fused_kernels_ok:
        reasons.append(
            f"the kernels implement [gate; up] (E, 2I, H) weights without bias and a SiLU gate, not {layout}: "
            "use backend='auto' or 'torch'"
        )
    if act_fn is not None and not _is_silu(act_fn):
        reasons.append(f"the kernels implement the SiLU gate, not {act_fn!r}: use backend='auto' or 'torch'")
    elsewhere = [n for n, t in named.items() if t.device != hidden_states.device]
    if elsewhere:
        reasons.append(
            f"{', '.join(elsewhere)} are not on the hidden states' device {hidden_states.device}: put them on one CUDA device"
        )
    if hidden_states.device.type != "cuda" and not interpreter_active():
        reasons.append(
            f"the kernels need a CUDA device, the hidden states are on {hidden_states.device}: use backend='auto' "
            "or 'torch' (tests run the kernels on the CPU with TRITON_INTERPRET=1 set before triton is imported)"
        )
    dtype = hidden_states.dtype
    if dtype not in KERNEL_DTYPES or (interpreter_active() and dtype == torch.bfloat16):
        reasons.append(
            f"the kernels compute in float16, bfloat16 or float32 (the interpreter: not bfloat16), not {dtype}: "
            "use backend='auto' or 'torch'"
        )
    elif any(w.dtype != dtype for w in weights):
        reasons.append(
            f"the base weights are {[str(w.dtype) for w in weights]} and the activations {dtype}: the kernels "
            "would compute in the activation dtype, the torch path in the weights' dtype; cast one to the other, "
            "or use backend='auto' or 'torch'"
        )
    return reasons


@dataclass(frozen=True)
class PackedExpertLora:
    """An adapter's factors as the kernels read them: gate and up A stacked along the rank.

    Only what a torch matmul reads is in the activation dtype (gate_up_A, and a shared down_B); the
    kernels cast the other factors tile by tile as they load them, and read gate B and up B through
    two pointers, so the largest factors are used in place.
    """

    gate_up_A: torch.Tensor  # (1|E, 2r, H), activation dtype
    gate_B: torch.Tensor  # (E, I, r)
    up_B: torch.Tensor  # (E, I, r), strided like gate_B
    down_A: torch.Tensor  # (E, r, I)
    down_B: torch.Tensor  # (1|E, H, r), activation dtype if shared
    scaling: float


def _stack(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """`parts` concatenated along dim 1 into `dtype` (the same values as casting each part first)."""
    if torch.compiler.is_compiling():  # traced into the graph; inductor fuses the casts into the cat
        return torch.cat([p.to(dtype) for p in parts], dim=1)
    # A cat into an output of another dtype took 75 us of host time per call on an H200 host (profiled,
    # benchmarks/host_profile.py); a same-dtype cat and one cast are two ordinary launches (not yet
    # profiled on the GPU).
    return torch.cat(parts, dim=1).to(dtype)


def _like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`tensor` with `reference`'s strides (the kernel reads both through one set), copying only if needed."""
    if tensor.stride() == reference.stride():
        return tensor
    return torch.empty_strided(reference.shape, reference.stride(), dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def pack_lora(lora: ExpertLoraFactors, dtype: torch.dtype) -> PackedExpertLora:
    """The factors in the kernels' layout, built on every call from the factors as they are now.

    No cache across calls, so stale factors cannot be served: a cache keyed on data pointers and
    version counters misses in-place edits through `.data` (they bump no version), and nothing
    cheaper than the packing itself proves a cached copy current. What is packed is small: one cat
    of gate/up A (CUDA: one kernel, or one copy per part when it casts) and one cast of a shared
    B_down whose dtype differs from the activations'. Gate B, up B, down A and a per-expert B_down,
    the large factors, are read in place.
    """
    down_B = lora["w2.lora_B"]
    return PackedExpertLora(
        gate_up_A=_stack([lora["w1.lora_A"], lora["w3.lora_A"]], dtype),
        gate_B=lora["w1.lora_B"],
        up_B=_like(lora["w3.lora_B"], lora["w1.lora_B"]),
        down_A=lora["w2.lora_A"],
        down_B=down_B.to(dtype) if is_shared(down_B) else down_B,
        scaling=lora.scaling,
    )


def triton_experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    lora: Optional[ExpertLoraFactors] = None,
    *,
    layout: Optional[ExpertsLayout] = None,
    apply_gate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    refusals_checked: bool = False,
) -> torch.Tensor:
    """Same contract as `torch_experts.experts_forward` (act_fn None means SiLU); where autograd is
    needed, the training kernels' forward and backward (`triton_train.py`).

    Raises `TritonBackendError` where the kernels would not compute exactly that (`triton_refusals`),
    unless the caller has just checked (`resolve_backend`). `apply_gate` is the block's own gate: a
    `layout` that is `fused_kernels_ok` says it is the SiLU gate the kernels implement.
    The LoRA factors run in the activation dtype, packed on each call (`pack_lora`).
    """
    if not refusals_checked:
        reasons = triton_refusals(
            hidden_states, (gate_up_proj, down_proj), lora, top_k_weights=top_k_weights, layout=layout, act_fn=act_fn
        )
        if gate_up_bias is not None or down_bias is not None:
            reasons.append("the kernels add no expert biases: use backend='auto' or 'torch'")
        if apply_gate is not None and layout is None:
            reasons.append("a gate function without its layout cannot be checked against the kernels' SiLU gate")
        if reasons:
            raise TritonBackendError.from_reasons(reasons)
    if lora is not None and needs_autograd(hidden_states, top_k_weights, *lora.values()):
        from .triton_train import triton_train_forward

        return triton_train_forward(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, lora)
    p = pack_lora(lora, hidden_states.dtype) if lora is not None else None
    if not torch.compiler.is_compiling():  # eager and CUDA-graph capture: skip the op dispatcher's cost
        return _fused_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, p)
    return fused_experts(
        hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj,
        *((p.gate_up_A, p.gate_B, p.up_B, p.down_A, p.down_B) if p is not None else (None,) * 5),
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
    gate_B: Optional[torch.Tensor],
    up_B: Optional[torch.Tensor],
    down_A: Optional[torch.Tensor],
    down_B: Optional[torch.Tensor],
    scaling: float,
) -> torch.Tensor:
    """The whole layer as one opaque op, so torch.compile and CUDA graphs treat it as a unit."""
    packed = None
    if gate_up_A is not None:
        packed = PackedExpertLora(gate_up_A, gate_B, up_B, down_A, down_B, scaling)
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
    with device_guard(hidden_states):
        num_tokens, top_k = top_k_index.shape
        num_experts, two_i, hidden = gate_up_proj.shape
        inter = two_i // 2
        dtype = hidden_states.dtype
        x = hidden_states.contiguous()
        num_pairs = num_tokens * top_k
        shape = shape_key(num_experts, hidden, inter)
        config_up = kernel_config("gate_up", num_tokens, x.device, shape)
        config_down = kernel_config("down", num_tokens, x.device, shape)
        routing_up = align_pairs_to_blocks(top_k_index, num_experts, config_up.block_m)
        routing_down = (
            routing_up
            if config_down.block_m == config_up.block_m
            else align_pairs_to_blocks(top_k_index, num_experts, config_down.block_m)
        )
        pair_weights = top_k_weights.reshape(-1).contiguous()
        precision = dot_precision(dtype)

        h = torch.empty(num_pairs, inter, dtype=dtype, device=x.device)
        expand = None
        if packed is not None:
            if is_shared(packed.gate_up_A):
                a = x @ packed.gate_up_A[0].T  # (T, 2r): shared A once per token
                expand = LoraExpansion(a, packed.gate_B, packed.scaling, top_k, packed.up_B)
            else:
                a = torch.empty(num_pairs, packed.gate_up_A.shape[1], dtype=dtype, device=x.device)
                launch(ExpertGemm(x, packed.gate_up_A, a, routing_up, config_up, precision, x_row_div=top_k))  # (S, 2r)
                expand = LoraExpansion(a, packed.gate_B, packed.scaling, 1, packed.up_B)
        launch(ExpertGemm(x, gate_up_proj, h, routing_up, config_up, precision, x_row_div=top_k, gated=True,
                          expansion=expand))

        rank_out = packed.down_B.shape[-1] if packed is not None and is_shared(packed.down_B) else 0
        # Shared B_down: the routing-weighted shrink lands in `rank_out` extra columns beside the down
        # output, so one per-token sum reduces both.
        out = torch.empty(num_pairs, hidden + rank_out, dtype=dtype, device=x.device)
        shrink = down_expand = None
        if rank_out and isinstance(down_proj, QuantizedExpertWeights):  # its kernel has no fused shrink
            launch(ExpertGemm(h, packed.down_A, out[:, hidden:], routing_down, config_down, precision,
                              pair_weights=pair_weights))
        elif rank_out:
            shrink = LoraShrink(packed.down_A, out[:, hidden:])
        elif packed is not None:
            a_down = torch.empty(num_pairs, packed.down_A.shape[1], dtype=dtype, device=x.device)
            launch(ExpertGemm(h, packed.down_A, a_down, routing_down, config_down, precision))
            down_expand = LoraExpansion(a_down, packed.down_B, packed.scaling)
        launch(ExpertGemm(h, down_proj, out[:, :hidden], routing_down, config_down, precision, expansion=down_expand,
                          shrink=shrink, pair_weights=pair_weights))
        summed = out.view(num_tokens, top_k, hidden + rank_out).sum(dim=1)  # (T, H + r)
        if not rank_out:
            return summed
        # B_down once per token, on the routing-weighted sum of the rank-r activations
        return torch.addmm(summed[:, :hidden], summed[:, hidden:], packed.down_B[0].T, alpha=packed.scaling)
