"""What a base model expects of an adapter: the modules our tuner would adapt, and their sizes.

The base is described by its config only (a config.json, a model directory or a
`PretrainedConfig`); the model is built on the meta device, so no weight is read or allocated,
and the expected modules come from the tuner's own `find_targets`, so validation and loading
cannot disagree. Nothing is executed from the base directory (no remote code).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..config import SharedMoeLoraConfig
from ..tuners import find_targets
from .io import AdapterFormatError, PathLike

BaseSpec = Union[PathLike, PretrainedConfig]


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
    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        raise AdapterFormatError(f"base config {path}: cannot be read ({type(err).__name__}: {err})") from err


def base_modules(base: BaseSpec, targets: list[str]) -> dict[str, Union[ExpertDims, LinearDims]]:
    """Module path (e.g. `model.layers.0.mlp.experts`) -> its dims, for every module `targets` adapt."""
    config = load_base_config(base)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError) as err:
        raise AdapterFormatError(f"base {type(config).__name__}: no causal-LM model for it ({err})") from err
    found = find_targets(model, SharedMoeLoraConfig(target_modules=targets))
    modules: dict[str, Union[ExpertDims, LinearDims]] = {}
    for name, kind in found.items():
        module = model.get_submodule(name)
        if kind == "experts":
            num_experts, two_inter, hidden = module.gate_up_proj.shape
            modules[name] = ExpertDims(num_experts, hidden, two_inter // 2)
        else:
            modules[name] = LinearDims(module.in_features, module.out_features)
    return modules
