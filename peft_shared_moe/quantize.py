"""A frozen base held quantized: `quantize_experts` turns every fused experts block of a model into
NF4 or block-wise FP8 storage (`ops/quantized.py`), one block at a time, so the peak memory stays
near the bf16 model's size and falls as blocks shrink. The blocks then compute through this library's
experts implementation (the torch path, dequantizing one expert at a time), adapters or not."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from .ops import IMPLEMENTATION_NAME, describe_experts, register_transformers_experts_implementation
from .ops.quantized import SCHEMES, QuantizationError, QuantizedExpertWeights


def quantize_experts(model: nn.Module, scheme: str, block: Optional[object] = None,
                     device: Optional[torch.device | str] = None) -> nn.Module:
    """Quantize, in place, the `gate_up_proj` and `down_proj` of every fused experts block of `model`
    with `scheme` ("nf4": `block` values per absmax, 64 by default; "fp8": (128, 128) blocks by
    default), and route the blocks through this library's experts implementation. The compute dtype
    is the weights' dtype before quantization. Refuses, before changing anything, a scheme it does not
    know, a block size that does not divide the weights, and blocks it cannot run exactly quantized
    (transposed, interleaved or biased storage, or weights already quantized).

    With `device` (e.g. "cuda" for a model loaded on the CPU), each block's weights are quantized
    there and the rest of the model follows at the end: the device never holds more than the
    quantized model plus one block's bf16 weights, well below the bf16 model's size."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"quantization scheme {scheme!r} is not supported; supported: {sorted(SCHEMES)}")
    blocks = [(name, m) for name, m in model.named_modules() if describe_experts(m) is not None]
    if not blocks:
        raise QuantizationError(f"{type(model).__name__} has no fused experts block to quantize")
    for name, experts in blocks:
        layout = describe_experts(experts)
        if layout.transposed or layout.interleaved or layout.has_bias:
            raise QuantizationError(f"{name}: {layout} storage is not supported quantized; [gate; up] (E, 2I, H) "
                                    f"and (E, H, I) weights without biases are")
        for p in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, p)
            if isinstance(weight, QuantizedExpertWeights):
                raise QuantizationError(f"{name}.{p} is already quantized ({weight.scheme})")
            if not weight.is_floating_point():
                raise QuantizationError(f"{name}.{p} is {weight.dtype}, not a floating-point weight to quantize")
    kwargs = {} if block is None else {"block": block}
    for name, experts in blocks:  # every size check first, so a refusal changes nothing
        for p in ("gate_up_proj", "down_proj"):
            try:
                SCHEMES[scheme].check(tuple(getattr(experts, p).shape), **kwargs)
            except QuantizationError as err:
                raise QuantizationError(f"{name}.{p}: {err}") from None
    register_transformers_experts_implementation()
    for name, experts in tqdm(blocks, desc=f"quantizing experts ({scheme})", disable=len(blocks) < 8):
        for p in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, p)
            target = weight.detach() if device is None else weight.detach().to(device)
            quantized = SCHEMES[scheme](target, **kwargs)
            del target
            delattr(experts, p)  # the bf16 parameter goes before the next block is quantized
            setattr(experts, p, quantized)
        config = getattr(experts, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = IMPLEMENTATION_NAME
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(IMPLEMENTATION_NAME)
    if device is not None:
        model.to(device)
    return model

