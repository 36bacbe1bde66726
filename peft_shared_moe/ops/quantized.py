"""Quantized expert weights: the storage formats and their torch reference.

Two schemes for a frozen base, both with block scales so a kernel can dequantize one tile at a time:

- **NF4** (QLoRA's 4-bit NormalFloat), laid out as bitsandbytes stores it: the flattened weight in
  blocks of `block` values (64 by default), each block scaled by its absolute maximum, each value
  the index of the nearest of the 16 NF4 levels, two indices per byte, the first in the high nibble.
- **FP8 block-wise**, as transformers' FineGrainedFP8 checkpoints store it: float8_e4m3fn values and
  one float32 `weight_scale_inv` per (128 x 128) block of the last two dims, value = fp8 * scale_inv.

`QuantizedExpertWeights` holds one projection's expert weights in either scheme where an experts
block keeps its `gate_up_proj` / `down_proj` (`peft_shared_moe.quantize_experts`); the torch experts
path computes its products by dequantizing one expert at a time. The semantics are weight-only
quantization: x @ dequantize(W)^T in the compute dtype (docs/DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# The 16 NF4 levels (QLoRA; the table bitsandbytes uses), ascending, in [-1, 1].
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


class QuantizationError(ValueError):
    """A weight or checkpoint this library cannot quantize or read exactly; the message says which."""


@dataclass(frozen=True)
class Nf4Weight:
    packed: torch.Tensor  # (numel / 2,) uint8, two level indices per byte, the first in the high nibble
    absmax: torch.Tensor  # (numel / block,) float32, one scale per block of the flattened weight
    shape: tuple[int, ...]
    block: int


@dataclass(frozen=True)
class Fp8BlockWeight:
    weight: torch.Tensor  # (..., N, K) float8_e4m3fn
    scale_inv: torch.Tensor  # (..., N / block_n, K / block_k) float32
    block: tuple[int, int]


def quantize_nf4(weight: torch.Tensor, block: int = 64) -> Nf4Weight:
    numel = weight.numel()
    if block <= 0 or block % 2 or numel % block:
        raise QuantizationError(f"NF4 block size {block} must be even and divide the weight's {numel} values "
                                f"(shape {tuple(weight.shape)})")
    blocks = weight.detach().reshape(-1, block).float()
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    levels = torch.tensor(NF4_LEVELS, device=weight.device)
    # nearest level: count the midpoints strictly below each value (a tie goes to the lower level, as
    # bitsandbytes' `x > threshold` decision tree sends it)
    midpoints = (levels[1:] + levels[:-1]) / 2
    index = torch.bucketize(scaled.reshape(-1), midpoints).to(torch.uint8)
    packed = (index[0::2] << 4) | index[1::2]
    return Nf4Weight(packed, absmax, tuple(weight.shape), block)


def dequantize_nf4(q: Nf4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    levels = torch.tensor(NF4_LEVELS, device=q.packed.device)
    index = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1).long()
    values = levels[index].reshape(-1, q.block) * q.absmax[:, None]
    return values.reshape(q.shape).to(dtype)


def quantize_fp8_blockwise(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> Fp8BlockWeight:
    *lead, n, k = weight.shape
    block_n, block_k = block
    if n % block_n or k % block_k:
        raise QuantizationError(f"FP8 block ({block_n}, {block_k}) must divide the weight's last two dims "
                                f"({n}, {k}) (shape {tuple(weight.shape)})")
    tiles = weight.detach().float().reshape(*lead, n // block_n, block_n, k // block_k, block_k)
    amax = tiles.abs().amax(dim=(-3, -1))  # (..., N / bn, K / bk)
    # a true division (CUDA turns `tensor / python_scalar` into a product with the reciprocal, which
    # can differ in the last bit and flip e4m3 codes): the same scales on every device
    scale_inv = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), 1.0)
    fp8 = (tiles / scale_inv[..., :, None, :, None]).to(torch.float8_e4m3fn).reshape(weight.shape)
    return Fp8BlockWeight(fp8, scale_inv, (block_n, block_k))


def dequantize_fp8_blockwise(q: Fp8BlockWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    *lead, n, k = q.weight.shape
    block_n, block_k = q.block
    if q.scale_inv.shape != (*lead, n // block_n, k // block_k) or n % block_n or k % block_k:
        raise QuantizationError(f"FP8 weight {tuple(q.weight.shape)} with block {q.block} needs scale_inv of shape "
                                f"{(*lead, -(-n // block_n), -(-k // block_k))} and dims divisible by the block, "
                                f"got scale_inv {tuple(q.scale_inv.shape)}")
    tiles = q.weight.float().reshape(*lead, n // block_n, block_n, k // block_k, block_k)
    return (tiles * q.scale_inv[..., :, None, :, None]).reshape(q.weight.shape).to(dtype)


class QuantizedExpertWeights(nn.Module):
    """One projection's (E, out, in) expert weights held quantized and frozen, where an experts block
    keeps its `gate_up_proj` / `down_proj`. It answers what the experts code reads of a weight (shape,
    compute dtype, device, never a gradient) and computes its grouped product by dequantizing one
    expert at a time (`grouped_linear`), so the whole weight is never materialised in 16 bits.
    The buffers are its state: `.to(device)` and the model's state dict carry them."""

    scheme: str = ""
    requires_grad = False

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.compute_dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def dim(self) -> int:
        return 3

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)` moves the storage; a dtype change (`model.to(torch.bfloat16)`, `.half()`) only
        changes the compute dtype: the quantized values and their float32 scales keep their dtypes."""
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(fn(buf[:0]).device)
        # what the cast does to a tensor of the compute dtype itself (so .half() then .float() returns)
        cast = fn(torch.empty(0, dtype=self.compute_dtype))
        if cast.is_floating_point():
            self.compute_dtype = cast.dtype
        return self

    @staticmethod
    def check(shape: tuple[int, ...], **block) -> None:
        """Raise `QuantizationError` naming the size if `shape` cannot be stored with `block`."""
        raise NotImplementedError

    def expert(self, e: int) -> torch.Tensor:
        """Expert e's (out, in) weight, dequantized into the compute dtype."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The whole (E, out, in) weight; for tests and references only."""
        return torch.stack([self.expert(e) for e in range(self.shape[0])])

    def grouped_linear(self, x: torch.Tensor, group_ends: list[int]) -> torch.Tensor:
        """(S, in) rows sorted by expert, `group_ends[e]` the end of expert e's rows -> (S, out).

        Differentiable in x; autograd keeps no dequantized weight (the backward dequantizes again),
        so training holds the quantized storage only."""
        return _DequantizingGroupedLinear.apply(x.to(self.compute_dtype), self, tuple(group_ends))

    def _grouped_product(self, rows: torch.Tensor, group_ends: tuple[int, ...], transposed: bool) -> torch.Tensor:
        """rows_e @ W_e^T per expert group (forward), or rows_e @ W_e (the input's gradient)."""
        out = rows.new_zeros(rows.shape[0], self.shape[2] if transposed else self.shape[1])
        start = 0
        for e, end in enumerate(group_ends):
            if end > start:
                w = self.expert(e)
                out[start:end] = rows[start:end] @ (w if transposed else w.T)
            start = end
        return out


class _DequantizingGroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedExpertWeights, group_ends: tuple[int, ...]) -> torch.Tensor:
        ctx.weight, ctx.group_ends = weight, group_ends
        return weight._grouped_product(x, group_ends, transposed=False)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = ctx.weight._grouped_product(grad_out, ctx.group_ends, transposed=True)
        return grad_x, None, None


class Nf4ExpertWeights(QuantizedExpertWeights):
    scheme = "nf4"

    @staticmethod
    def check(shape: tuple[int, ...], block: int = 64) -> None:
        per_expert = shape[1] * shape[2]
        if not isinstance(block, int) or isinstance(block, bool):
            raise QuantizationError(f"NF4 block size must be an int (values per absmax), got {block!r}")
        if block <= 0 or block % 2 or per_expert % block:  # blocks may not straddle experts
            raise QuantizationError(f"NF4 block size {block} must be even and divide one expert's {per_expert} "
                                    f"values (weight {tuple(shape)})")

    def __init__(self, weight: torch.Tensor, block: int = 64, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(tuple(weight.shape), dtype or weight.dtype)
        self.check(tuple(weight.shape), block)
        quantized = [quantize_nf4(w, block) for w in weight]
        self.block = block
        self.register_buffer("packed", torch.stack([q.packed for q in quantized]))  # (E, out * in / 2)
        self.register_buffer("absmax", torch.stack([q.absmax for q in quantized]))  # (E, out * in / block)

    def expert(self, e: int) -> torch.Tensor:
        return dequantize_nf4(Nf4Weight(self.packed[e], self.absmax[e], tuple(self.shape[1:]), self.block),
                              self.compute_dtype)


class Fp8ExpertWeights(QuantizedExpertWeights):
    scheme = "fp8"

    @staticmethod
    def block_pair(block: int | tuple[int, int]) -> tuple[int, int]:
        """(block_n, block_k) from an int b (meaning b x b, as the NF4 block is one int) or a pair."""
        pair = (block, block) if isinstance(block, int) else tuple(block)
        if len(pair) != 2 or not all(isinstance(b, int) and b > 0 for b in pair):
            raise QuantizationError(f"FP8 block must be a positive int or a (block_n, block_k) pair, got {block!r}")
        return pair

    @classmethod
    def check(cls, shape: tuple[int, ...], block: int | tuple[int, int] = (128, 128)) -> None:
        block = cls.block_pair(block)
        if shape[1] % block[0] or shape[2] % block[1]:
            raise QuantizationError(f"FP8 block {block} must divide the weight's last two dims "
                                    f"{tuple(shape[1:])} (shape {tuple(shape)})")

    def __init__(self, weight: torch.Tensor, block: int | tuple[int, int] = (128, 128),
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(tuple(weight.shape), dtype or weight.dtype)
        self.check(tuple(weight.shape), block)
        self.block = self.block_pair(block)
        num_experts, n, k = weight.shape
        fp8 = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
        scale_inv = torch.empty(num_experts, n // self.block[0], k // self.block[1], device=weight.device)
        for e in range(num_experts):  # one expert in float32 at a time, never the whole projection
            q = quantize_fp8_blockwise(weight[e], self.block)
            fp8[e], scale_inv[e] = q.weight, q.scale_inv
        self.register_buffer("weight", fp8)  # (E, out, in) float8_e4m3fn
        self.register_buffer("scale_inv", scale_inv)  # (E, out / bn, in / bk) float32

    @classmethod
    def check_stored(cls, weight: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int]) -> tuple[int, int]:
        """The (block_n, block_k) of FP8 values and scales already in this layout; raises where they are not."""
        block = cls.block_pair(block)
        cls.check(tuple(weight.shape), block)
        num_experts, n, k = weight.shape
        want = (num_experts, n // block[0], k // block[1])
        if weight.dtype != torch.float8_e4m3fn or scale_inv.dtype != torch.float32 or tuple(scale_inv.shape) != want:
            raise QuantizationError(
                f"FP8 experts need float8_e4m3fn weights and float32 scale_inv of shape {want} for weight "
                f"{tuple(weight.shape)} and block {block}; got {weight.dtype} and {scale_inv.dtype} "
                f"{tuple(scale_inv.shape)}")
        return block

    @classmethod
    def from_stored(cls, weight: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int],
                    dtype: torch.dtype) -> "Fp8ExpertWeights":
        """Adopt FP8 values and scales already in this layout (a FineGrainedFP8 checkpoint's), as they are:
        no copy, no re-quantization."""
        block = cls.check_stored(weight, scale_inv, block)
        self = cls.__new__(cls)
        QuantizedExpertWeights.__init__(self, tuple(weight.shape), dtype)
        self.block = block
        self.register_buffer("weight", weight.detach())
        self.register_buffer("scale_inv", scale_inv.detach())
        return self

    def expert(self, e: int) -> torch.Tensor:
        return dequantize_fp8_blockwise(Fp8BlockWeight(self.weight[e], self.scale_inv[e], self.block), self.compute_dtype)


SCHEMES = {"nf4": Nf4ExpertWeights, "fp8": Fp8ExpertWeights}


def holds_quantized(weights) -> bool:
    return any(isinstance(w, QuantizedExpertWeights) for w in weights)
