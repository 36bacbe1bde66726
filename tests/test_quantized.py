"""Quantized weight formats (ops/quantized.py): NF4 and block-wise FP8 round trips against known
values, the bitsandbytes nibble order, error bounds on random weights, and the sizes refused."""

from __future__ import annotations

import pytest
import torch

from peft_shared_moe.ops.quantized import (
    FP8_MAX, NF4_LEVELS, QuantizationError, dequantize_fp8_blockwise, dequantize_nf4, quantize_fp8_blockwise,
    quantize_nf4,
)


def test_nf4_levels_round_trip_exactly_and_pack_high_nibble_first():
    levels = torch.tensor(NF4_LEVELS)
    scale = torch.tensor([2.5, 0.125])
    weight = torch.cat([levels * scale[0], levels.flip(0) * scale[1]]).reshape(4, 8)  # two blocks of 16
    q = quantize_nf4(weight, block=16)
    assert torch.equal(q.absmax, scale)
    assert torch.equal(dequantize_nf4(q), weight)
    # first block: indices 0, 1, ... 15 -> bytes 0x01, 0x23, ...; second block: 15, 14, ... -> 0xFE, ...
    assert q.packed[:2].tolist() == [0x01, 0x23]
    assert q.packed[8:10].tolist() == [0xFE, 0xDC]


def test_nf4_picks_the_nearest_level_of_random_weights():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 32, 64, generator=gen, dtype=torch.float64)
    q = quantize_nf4(weight)
    got = dequantize_nf4(q, torch.float64)
    blocks = weight.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    nearest = levels[((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(-1)] * absmax
    assert torch.allclose(got.reshape(-1, 64), nearest, rtol=1e-6, atol=1e-7)
    assert got.shape == weight.shape and got.dtype == torch.float64


def test_fp8_blockwise_round_trips_representable_values_exactly():
    gen = torch.Generator().manual_seed(1)
    # values on the e4m3 grid (3 mantissa bits) scaled per 2x4 block, with the block's maximum at 448
    mantissa = torch.randint(8, 16, (2, 4, 8), generator=gen).double() / 8
    exponent = torch.randint(-4, 5, (2, 4, 8), generator=gen).double()
    grid = mantissa * 2.0 ** exponent
    for row, col in ((0, 0), (0, 4), (2, 0), (2, 4)):  # each block's maximum
        grid[:, row, col] = FP8_MAX
    scale = torch.tensor([[[0.5, 3.0], [0.25, 1.0]], [[2.0, 0.125], [1.5, 4.0]]], dtype=torch.float64)
    weight = grid * scale.repeat_interleave(2, 1).repeat_interleave(4, 2)
    q = quantize_fp8_blockwise(weight, block=(2, 4))
    assert q.weight.dtype == torch.float8_e4m3fn
    assert torch.allclose(q.scale_inv.double(), scale)
    assert torch.equal(dequantize_fp8_blockwise(q, torch.float64), weight)


def test_fp8_blockwise_error_of_random_weights():
    weight = torch.randn(3, 256, 384, generator=torch.Generator().manual_seed(2))
    q = quantize_fp8_blockwise(weight)
    assert q.scale_inv.shape == (3, 2, 3)
    err = (dequantize_fp8_blockwise(q) - weight).abs()
    assert (err <= weight.abs() / 16 + 2 ** -9 * q.scale_inv.max()).all()  # e4m3: 3 mantissa bits


def test_sizes_that_do_not_divide_are_refused_naming_them():
    with pytest.raises(QuantizationError, match=r"NF4 block size 64 must be even and divide the weight's 96 values"):
        quantize_nf4(torch.randn(3, 32))
    with pytest.raises(QuantizationError, match=r"FP8 block \(128, 128\) must divide the weight's last two dims \(128, 200\)"):
        quantize_fp8_blockwise(torch.randn(2, 128, 200))
    q = quantize_fp8_blockwise(torch.randn(128, 256))
    bad = type(q)(q.weight, q.scale_inv[:, :1], q.block)
    with pytest.raises(QuantizationError, match=r"needs scale_inv of shape \(1, 2\)"):
        dequantize_fp8_blockwise(bad)
