"""Shared-outer MoE LoRA for Hugging Face transformers + PEFT.

Importing this package registers the peft_type "SHARED_MOE_LORA" with PEFT, so
`peft.get_peft_model(model, SharedMoeLoraConfig(...))` and `PeftModel.from_pretrained` work.
"""

from peft import mapping as _peft_mapping

from .config import PEFT_TYPE, SharedMoeLoraConfig
from .ops import UnsupportedExpertsError, register_transformers_experts_implementation
from .ops.triton_support import TritonBackendError
from .tuners import ExpertsLoraLayer, LinearLoraLayer, SharedMoeLoraModel, is_fused_experts
from .tuners.loading import install_loading_guards
from .formats import export_adapter, import_adapter, inspect_adapter, shard_adapter
from .ops.quantized import QuantizationError
from .quantize import quantize_experts
from .quantized_loading import ExpertsQuantizationConfig


def _register_with_peft() -> None:
    # PeftType is a closed enum; PEFT >= 0.21 looks custom types up by string in these mappings.
    _peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = SharedMoeLoraConfig
    _peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = SharedMoeLoraModel
    _peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = SharedMoeLoraModel.prefix


_register_with_peft()
register_transformers_experts_implementation()
install_loading_guards()

__version__ = "0.1.0"

__all__ = [
    "ExpertsLoraLayer",
    "ExpertsQuantizationConfig",
    "LinearLoraLayer",
    "PEFT_TYPE",
    "QuantizationError",
    "SharedMoeLoraConfig",
    "SharedMoeLoraModel",
    "TritonBackendError",
    "UnsupportedExpertsError",
    "export_adapter",
    "import_adapter",
    "inspect_adapter",
    "is_fused_experts",
    "quantize_experts",
    "shard_adapter",
]
