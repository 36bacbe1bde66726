"""A frozen base held quantized: `quantize_experts` turns every fused experts block of a model into
NF4 or block-wise FP8 storage (`ops/quantized.py`), or adopts the FP8 experts of a FineGrainedFP8
checkpoint as they are, and routes the blocks through this library's experts implementation."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from .ops import IMPLEMENTATION_NAME, describe_experts, register_transformers_experts_implementation
from .ops.quantized import SCHEMES, Fp8ExpertWeights, QuantizationError, QuantizedExpertWeights
from .parallel import is_dtensor

PROJECTIONS = ("gate_up_proj", "down_proj")


def _is_fine_grained_fp8(module: nn.Module) -> bool:
    """transformers' FineGrainedFP8 `FP8Experts`: e4m3 expert weights with a `<name>_scale_inv` beside each."""
    return (getattr(module, "gate_up_proj_scale_inv", None) is not None
            and getattr(getattr(module, "gate_up_proj", None), "dtype", None) == torch.float8_e4m3fn)


def _fine_grained_fp8_problems(name: str, module: nn.Module) -> list[str]:
    problems = []
    if getattr(module, "activation_scheme", "dynamic") != "dynamic":
        problems.append(f"{name}: activation_scheme={module.activation_scheme!r} (static activation scales) is not "
                        f"supported; dynamic is")
    if getattr(module, "block_size", None) is None:
        problems.append(f"{name}: per-tensor FP8 scales (block_size None) are not supported; block-wise are")
    if getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
        problems.append(f"{name}: FP8 experts with biases or without a gate projection are not supported")
    for p in PROJECTIONS:
        scale = getattr(module, f"{p}_scale_inv", None)
        if scale is None or scale.dtype != torch.float32:
            problems.append(f"{name}.{p}_scale_inv is {getattr(scale, 'dtype', None)}, not float32 (UE8M0 and FP4 "
                            f"checkpoints are not supported)")
        elif getattr(module, "block_size", None) is not None:
            try:
                Fp8ExpertWeights.check_stored(getattr(module, p), scale, tuple(module.block_size))
            except QuantizationError as err:
                problems.append(f"{name}.{p}: {err}")
    return problems


def _storage_problems(name: str, weight: object) -> list[str]:
    """Why a weight cannot be quantized here, before anything changes."""
    if isinstance(weight, QuantizedExpertWeights):
        return [f"{name} is already quantized ({weight.scheme})"]
    if is_dtensor(weight):
        return [f"{name} is a DTensor (sharded by tensor or expert parallelism); quantize the whole model "
                f"before sharding it"]
    if weight.is_meta:
        return [f"{name} is on the meta device (not loaded, or offloaded by accelerate); load its values first"]
    if not weight.is_floating_point():
        return [f"{name} is {weight.dtype}, not a floating-point weight to quantize"]
    return []


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the rest of the model computes in (for adopted FP8 experts, whose storage says nothing)."""
    for p in model.parameters():
        if p.dtype in (torch.bfloat16, torch.float16, torch.float32):
            return p.dtype
    return torch.bfloat16


class _RefusedSave:
    """Stands in for `save_pretrained` / `push_to_hub` of a model whose experts are held quantized here:
    transformers would write the quantized buffers under names no loader reads, and the checkpoint would
    reload with random experts. (A class, not a closure, so the model still deepcopies and pickles.)"""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def __call__(self, *args, **kwargs):
        raise QuantizationError(
            f"{self.model_name}'s experts are held quantized by peft_shared_moe, which no checkpoint loader reads "
            f"back; save the adapter instead (PeftModel.save_pretrained: it loads onto the bf16 base unchanged), and "
            f"keep the base's own checkpoint")


def quantize_experts(model: nn.Module, scheme: str, block: Optional[object] = None,
                     device: Optional[torch.device | str] = None) -> nn.Module:
    """Hold, in place, the `gate_up_proj` and `down_proj` of every fused experts block of `model` quantized
    with `scheme`, and route the blocks through this library's experts implementation:

    - "nf4": `block` values per absmax (64 by default), bitsandbytes' layout;
    - "fp8": e4m3 with a float32 scale per (block_n, block_k) tile ((128, 128) by default; an int b
      means (b, b)). Experts of a FineGrainedFP8 checkpoint (`FP8Experts`) are adopted as stored, no
      re-quantization; they then compute weight-only, x @ dequantize(W)^T in the model's dtype, as
      transformers' `FineGrainedFP8Config(dequantize=True)` would, instead of quantizing activations.

    The compute dtype is the weights' dtype before quantization. Refuses, before changing anything, a
    scheme it does not know, a block size that does not divide the weights, and blocks it cannot run
    exactly quantized (transposed, interleaved or biased storage, DTensor shards, meta weights, weights
    already quantized). Afterwards the model's own `save_pretrained` refuses (see `_RefusedSave`).

    Each projection is quantized one expert at a time, so besides the model the process holds one
    projection's quantized copy plus one expert in float32. With `device` (e.g. "cuda" for a model
    loaded on the CPU) the quantized storage is made there, block by block, and the rest of the model
    follows at the end: the device never holds the bf16 experts."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"quantization scheme {scheme!r} is not supported; supported: {sorted(SCHEMES)}")
    adopted = [(name, m) for name, m in model.named_modules() if _is_fine_grained_fp8(m)]
    if adopted and scheme != "fp8":
        raise QuantizationError(f"{adopted[0][0]} holds FineGrainedFP8 experts; they can be adopted as 'fp8' only "
                                f"(re-quantizing FP8 values to {scheme!r} would compound two roundings)")
    if adopted and block is not None:
        raise QuantizationError(f"{adopted[0][0]} holds FineGrainedFP8 experts, adopted with their stored block "
                                f"{tuple(adopted[0][1].block_size)}; pass no block")
    adopted_ids = {id(m) for _, m in adopted}
    blocks = [(name, m) for name, m in model.named_modules()
              if id(m) not in adopted_ids and describe_experts(m) is not None]
    if not blocks and not adopted:
        raise QuantizationError(f"{type(model).__name__} has no fused experts block to quantize")
    kwargs = {} if block is None else {"block": block}
    problems = [p for name, m in adopted for p in _fine_grained_fp8_problems(name, m)]
    problems += block_problems(blocks, scheme, kwargs)
    if problems:  # every check first, so a refusal changes nothing
        raise QuantizationError("; ".join(problems))

    dtype = _compute_dtype(model)
    for name, experts in adopted:
        for p in PROJECTIONS:
            stored = Fp8ExpertWeights.from_stored(getattr(experts, p), getattr(experts, f"{p}_scale_inv"),
                                                  tuple(experts.block_size), dtype)
            delattr(experts, f"{p}_scale_inv")
            install(experts, p, stored.to(device) if device is not None else stored)
    for name, experts in tqdm(blocks, desc=f"quantizing experts ({scheme})", disable=len(blocks) < 8):
        for p in PROJECTIONS:
            weight = getattr(experts, p)
            target = weight.detach() if device is None else weight.detach().to(device)
            quantized = SCHEMES[scheme](target, **kwargs)
            del target
            install(experts, p, quantized)  # the bf16 parameter goes before the next block is quantized
    route_through_library(model, [m for _, m in adopted + blocks])
    if device is not None:
        model.to(device)
    return model


def install(experts: nn.Module, projection: str, quantized: QuantizedExpertWeights) -> None:
    """Put `quantized` where the block keeps `projection`, dropping the float parameter (or meta
    placeholder) that was there; transformers' weight initialisation then leaves it alone."""
    quantized._is_hf_initialized = True
    delattr(experts, projection)
    setattr(experts, projection, quantized)


def block_problems(blocks: list[tuple[str, nn.Module]], scheme: str, kwargs: dict, check_storage: bool = True) -> list[str]:
    """Why each experts block cannot be held in `scheme` (layout, storage, block sizes); [] if all can.
    `check_storage=False` for a model still on the meta device (quantized while it loads)."""
    problems = []
    for name, experts in blocks:
        layout = describe_experts(experts)
        if layout.transposed or layout.interleaved or layout.has_bias:
            problems.append(f"{name}: {layout} storage is not supported quantized; [gate; up] (E, 2I, H) and "
                            f"(E, H, I) weights without biases are")
            continue
        for p in PROJECTIONS:
            weight = getattr(experts, p)
            found = _storage_problems(f"{name}.{p}", weight) if check_storage else []
            if not found:
                try:
                    SCHEMES[scheme].check(tuple(weight.shape), **kwargs)
                except QuantizationError as err:
                    found = [f"{name}.{p}: {err}"]
            problems += found
    return problems


def route_through_library(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Point the quantized blocks at this library's experts implementation (the only one that reads them),
    and make the model's own `save_pretrained` refuse (`_RefusedSave`)."""
    from transformers import PreTrainedModel

    register_transformers_experts_implementation()
    for experts in blocks:
        config = getattr(experts, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = IMPLEMENTATION_NAME
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(IMPLEMENTATION_NAME)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.save_pretrained = module.push_to_hub = _RefusedSave(type(module).__name__)
