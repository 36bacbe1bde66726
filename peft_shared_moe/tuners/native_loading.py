"""A key check in front of transformers' own adapter loading, for SHARED_MOE_LORA adapters.

`model.load_adapter(dir)` and `AutoModelForCausalLM.from_pretrained(adapter_dir)` inject the adapter
with PEFT, then load *every* tensor of the adapter file whose key names a model parameter, base
weights included (an `lm_head.weight` in an adapter file silently replaces the model's). PEFT's own
loading goes through our tuner, which refuses such keys; transformers' does not call any tuner hook.
So, for our adapter type only, the file's keys are read (safetensors header, no tensor data) and
checked before transformers touches the model. transformers offers no hook for this, hence a thin
wrapper around `PeftAdapterMixin.load_adapter`, installed once at import.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from ..config import PEFT_TYPE
from ..factors import EXPERT_FACTORS

# Every key an adapter of ours may hold: expert factors, dense-linear factors, and (with a `bias`
# setting other than "none") trainable biases.
FACTOR_SUFFIXES = tuple(f".{f}.weight" for f in EXPERT_FACTORS) + (".lora_A.weight", ".lora_B.weight")


def check_adapter_keys(keys: Iterable[str], where: str, bias: str = "none") -> None:
    """Refuse, naming them, keys that are not LoRA factors (or declared trainable biases)."""
    bad = sorted(k for k in keys if not (k.endswith(FACTOR_SUFFIXES) or (bias != "none" and k.endswith("bias"))))
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ValueError(
            f"{where}: {shown} are not LoRA factors of a {PEFT_TYPE.value} adapter (expected keys ending in "
            f"{FACTOR_SUFFIXES[0]}, ... or .lora_A.weight / .lora_B.weight); loading would overwrite the base "
            f"model's weights, so nothing was loaded"
        )


def _file_keys(directory: Path) -> Optional[list[str]]:
    safetensors_file = directory / "adapter_model.safetensors"
    if safetensors_file.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as handle:
            return list(handle.keys())
    pickle_file = directory / "adapter_model.bin"
    if pickle_file.is_file():
        import torch

        return list(torch.load(pickle_file, map_location="cpu", weights_only=True, mmap=True))
    return None


def _config_of(peft_config: Any, directory: Optional[Path]) -> Optional[dict]:
    if peft_config is not None:
        return peft_config if isinstance(peft_config, dict) else vars(peft_config)
    config_file = directory / "adapter_config.json" if directory is not None else None
    if config_file is not None and config_file.is_file():
        return json.loads(config_file.read_text(encoding="utf-8"))
    return None


def check_native_load(peft_model_id: Any, peft_config: Any, adapter_state_dict: Any, adapter_kwargs: Any) -> None:
    """The check `load_adapter` runs first; it does nothing for any other adapter type."""
    directory = None
    if peft_model_id is not None and Path(str(peft_model_id)).is_dir():
        directory = Path(str(peft_model_id)) / ((adapter_kwargs or {}).get("subfolder") or "")
    config = _config_of(peft_config, directory)
    if config is None or config.get("peft_type") != PEFT_TYPE:
        return
    bias = config.get("bias", "none")
    if adapter_state_dict is not None:
        check_adapter_keys(adapter_state_dict, "adapter_state_dict", bias)
    elif directory is not None:
        keys = _file_keys(directory)
        if keys is not None:
            check_adapter_keys(keys, str(directory), bias)


def install_native_load_check() -> None:
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.load_adapter
    if getattr(original, "_checks_shared_moe_keys", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs).arguments
        check_native_load(
            bound.get("peft_model_id"), bound.get("peft_config"), bound.get("adapter_state_dict"),
            bound.get("adapter_kwargs"),
        )
        return original(self, *args, **kwargs)

    load_adapter._checks_shared_moe_keys = True  # type: ignore[attr-defined]
    PeftAdapterMixin.load_adapter = load_adapter
