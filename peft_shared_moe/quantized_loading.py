"""Quantize the experts while transformers loads a checkpoint: the quantization config of this library.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=ExpertsQuantizationConfig("nf4"))

is `quantize_experts(from_pretrained(path), "nf4")` without the bf16 experts ever existing whole: it
plugs into transformers' own quantizer hook (`register_quantization_config` / `register_quantizer`).
transformers merges one layer's per-expert checkpoint tensors into the fused (E, out, in) weight and
then hands it to our conversion op, which quantizes it, puts the `QuantizedExpertWeights` module in the
place of the (meta) parameter and reports the key loaded; so at any moment one projection of one layer
exists in 16 bits. Works with transformers 5.17 and 5.24 (docs/DESIGN.md, "A quantized base").

Every block is checked on the meta model before a byte is read (the block sizes, the layout), so a
checkpoint this cannot quantize exactly fails before loading. Tensor- or expert-parallel loading is
not supported: a rank's shard fails the op's shape check instead of being quantized as a whole weight.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .ops import describe_experts
from .ops.quantized import SCHEMES, Fp8ExpertWeights, QuantizationError
from .quantize import PROJECTIONS, block_problems, install, route_through_library

METHOD = "peft_shared_moe"


class ExpertsQuantizationConfig(QuantizationConfigMixin):
    """Hold every fused experts block's weights in `scheme` ("nf4" or "fp8", `block` as in
    `quantize_experts`) as the checkpoint loads; every other weight loads as usual."""

    def __init__(self, scheme: str = "nf4", block: Optional[object] = None, **kwargs) -> None:
        if scheme not in SCHEMES:
            raise QuantizationError(f"quantization scheme {scheme!r} is not supported; supported: {sorted(SCHEMES)}")
        self.quant_method = METHOD
        self.scheme = scheme
        self.block = list(block) if isinstance(block, (tuple, list)) else block  # JSON-friendly in config.json
        if block is None:
            return
        given = self.block_kwargs()["block"]  # checked now; whether it divides the weights, once the model is known
        if scheme == "fp8":
            Fp8ExpertWeights.block_pair(given)
        elif not isinstance(given, int) or isinstance(given, bool) or given <= 0 or given % 2:
            raise QuantizationError(f"NF4 block size must be a positive even int (values per absmax), got {given!r}")

    def block_kwargs(self) -> dict:
        if self.block is None:
            return {}
        return {"block": tuple(self.block) if isinstance(self.block, list) else self.block}


def _install(experts: nn.Module, projection: str, weight: torch.Tensor, config: ExpertsQuantizationConfig) -> None:
    install(experts, projection, SCHEMES[config.scheme](weight.detach(), **config.block_kwargs()))


class _QuantizeOnLoad(ConversionOps):
    """Runs after the converter has merged one projection of one layer: {"<...>.experts.gate_up_proj":
    (E, out, in)} -> nothing for transformers to set; the quantized module is installed instead."""

    def __init__(self, quantizer: "ExpertsQuantizer") -> None:
        self.quantizer = quantizer

    def convert(self, input_dict: dict, model: Optional[nn.Module] = None, missing_keys: Optional[set] = None,
                **kwargs) -> dict:
        for name, value in input_dict.items():
            weight = value[0] if isinstance(value, list) else value
            path, _, projection = name.rpartition(".")
            experts = model.get_submodule(path)
            expected = tuple(getattr(experts, projection).shape)
            if tuple(weight.shape) != expected:  # experts missing from the checkpoint, or a TP/EP shard
                raise QuantizationError(f"{name}: the checkpoint gives {tuple(weight.shape)}, the model expects "
                                        f"{expected} (tensor- or expert-parallel loading is not supported with "
                                        f"quantized experts)")
            _install(experts, projection, weight, self.quantizer.quantization_config)
            if missing_keys is not None:
                missing_keys.discard(name)
        return {}


class ExpertsQuantizer(HfQuantizer):
    requires_calibration = False

    def validate_environment(self, *args, **kwargs) -> None:
        if self.pre_quantized:
            raise QuantizationError(f"{METHOD} quantizes bf16/fp32 checkpoints while loading them; it has no saved "
                                    f"format to load (save the adapter, and keep the base's own checkpoint)")
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and {"disk"} & set(map(str, device_map.values())):
            raise QuantizationError("offloading to disk is not supported with quantized experts; use a device_map "
                                    "without 'disk'")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        """Every block checked on the meta model, so nothing is read for a checkpoint that must fail."""
        config = self.quantization_config
        blocks = [(name, m) for name, m in model.named_modules() if describe_experts(m) is not None]
        if not blocks:
            raise QuantizationError(f"{type(model).__name__} has no fused experts block to quantize")
        problems = block_problems(blocks, config.scheme, config.block_kwargs(), check_storage=False)
        if problems:
            raise QuantizationError("; ".join(problems))
        self.blocks = blocks
        self.targets = {f"{name}.{p}" for name, _ in blocks for p in PROJECTIONS}
        return model

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs) -> bool:
        return param_name in self.targets

    def param_element_size(self, model: nn.Module, param_name: str, param: torch.Tensor) -> float:
        """Bytes per value once stored, so device_map="auto" and the allocator warm-up size the quantized model."""
        if param_name not in self.targets:
            return super().param_element_size(model, param_name, param)
        block = self.quantization_config.block_kwargs().get("block")
        if self.quantization_config.scheme == "nf4":
            return 0.5 + 4 / (block or 64)
        block_n, block_k = Fp8ExpertWeights.block_pair(block or 128)
        return 1 + 4 / (block_n * block_k)

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeOnLoad(self)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        for name, experts in self.blocks:  # a projection the checkpoint lacked (reported missing, initialised)
            for p in PROJECTIONS:
                if isinstance(getattr(experts, p), torch.Tensor):
                    _install(experts, p, getattr(experts, p), self.quantization_config)
        route_through_library(model, [m for _, m in self.blocks])
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return False  # no loader reads the quantized buffers back; the adapter saves as usual

    @property
    def is_trainable(self) -> bool:
        return True  # an adapter on the frozen quantized base


def register() -> None:
    """Make `quantization_config=ExpertsQuantizationConfig(...)` known to transformers (once per process)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(METHOD, ExpertsQuantizationConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(METHOD, ExpertsQuantizer)


register()
