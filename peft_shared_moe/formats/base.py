"""What a base model expects of an adapter: the modules our tuner would adapt, and their sizes.

The base is described by its config only (a config.json, a model directory or a
`PretrainedConfig`); the model is built on the meta device, so no weight is read or allocated,
and the expected modules come from the tuner's own `find_targets`, so validation and loading
cannot disagree. Nothing is executed from the base directory (no remote code).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..config import SharedMoeLoraConfig
from ..ops.experts_layout import ExpertsLayout, describe_experts
from ..tuners import find_targets
from .io import AdapterFormatError, PathLike, read_json_object

BaseSpec = Union[PathLike, PretrainedConfig]
# What transformers raises for a config.json with a value of the wrong type or range, while building
# the config or the (meta-device) model from it: bad input, reported as such, not an internal fault.
_BAD_CONFIG_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError,
                      OverflowError, RecursionError, StrictDataclassError)


@dataclass(frozen=True)
class ExpertDims:
    num_experts: int
    hidden: int
    inter: int


@dataclass(frozen=True)
class LinearDims:
    in_features: int
    out_features: int


def load_base_config(base: BaseSpec) -> PretrainedConfig:
    """A `PretrainedConfig` from itself, a config.json file, or a model directory holding one."""
    if isinstance(base, PretrainedConfig):
        return base
    path = Path(base)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise AdapterFormatError(f"base {base}: expected a config.json file or a model directory holding one")
    data = read_json_object(path)
    if not isinstance(data.get("model_type"), str):
        raise AdapterFormatError(f"base config {path}: model_type must be a string, found {data.get('model_type')!r}")
    try:
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except _BAD_CONFIG_ERRORS as err:
        raise AdapterFormatError(f"base config {path}: cannot be read ({type(err).__name__}: {str(err)[:300]})") from err


def _meta_model(base: BaseSpec):
    config = load_base_config(base)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except _BAD_CONFIG_ERRORS as err:
        raise AdapterFormatError(
            f"base {_name(base)}: no causal-LM model can be built from its {type(config).__name__} "
            f"({type(err).__name__}: {str(err)[:300]})"
        ) from err


def base_experts_layouts(base: BaseSpec) -> dict[str, ExpertsLayout]:
    """Module path -> how each experts block the tuner would adapt stores its weights (storage order,
    gate/up rows), for layouts whose tensors follow the base's storage (PEFT's target_parameters)."""
    model = _meta_model(base)
    found = find_targets(model, SharedMoeLoraConfig(target_modules=["experts"]))
    return {name: describe_experts(model.get_submodule(name)) for name, kind in found.items() if kind == "experts"}


def base_modules(base: BaseSpec, targets: list[str]) -> dict[str, Union[ExpertDims, LinearDims]]:
    """Module path (e.g. `model.layers.0.mlp.experts`) -> its dims, for every module `targets` adapt."""
    model = _meta_model(base)
    found = find_targets(model, SharedMoeLoraConfig(target_modules=targets))
    modules: dict[str, Union[ExpertDims, LinearDims]] = {}
    for name, kind in found.items():
        module = model.get_submodule(name)
        if kind == "experts":  # the block's own layout: stored (E, 2I, H) or, transposed, (E, H, 2I)
            layout = describe_experts(module)
            modules[name] = ExpertDims(layout.num_experts, layout.hidden, layout.inter)
        else:
            modules[name] = LinearDims(module.in_features, module.out_features)
    return modules


def _name(base: BaseSpec) -> str:
    return type(base).__name__ if isinstance(base, PretrainedConfig) else str(base)


def check_architecture(adapter_config: dict, base: BaseSpec, where: str) -> None:
    """Refuse an adapter whose config records another base class than the base's own architectures.

    PEFT records the class it wrapped (`auto_mapping.base_model_class`) for adapters without a task
    type. Shapes alone cannot tell a Mixtral adapter from a GPT-OSS one when the sizes agree, and the
    two place gate/up differently, so a merge across architectures would be silently wrong.
    """
    mapping = adapter_config.get("auto_mapping")
    recorded = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    architectures = getattr(load_base_config(base), "architectures", None) or []
    if isinstance(recorded, str) and architectures and recorded not in architectures:
        raise AdapterFormatError(
            f"{where}: the adapter was trained on {recorded} (auto_mapping.base_model_class), but the base is "
            f"{', '.join(architectures)}; pass --allow-other-architecture (allow_other_architecture=True) if that is "
            f"really meant"
        )

