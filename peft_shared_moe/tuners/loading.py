"""Loading is all or nothing: guards around the loading entry points that offer no tuner hook.

- PEFT's `PeftModel.from_pretrained` and `PeftModel.load_adapter` inject the adapter's layers first
  and read its tensors after. Our tuner checks those tensors (keys, shapes, values) before any is
  written (`SharedMoeLoraModel.check_adapter_state_dict`), but by then the layers are in place. A
  refused load must leave the model as it was, every earlier adapter included: the guard takes out
  again exactly what the refused call added (its layers, its module copies, its config entry, the
  base's `requires_grad` flags), and nothing that was there before it.
- transformers' `model.load_adapter(dir)` and `AutoModelForCausalLM.from_pretrained(adapter_dir)`
  inject the adapter with PEFT and then load *every* tensor of the file whose key names a model
  parameter, base weights included (an `lm_head.weight` in an adapter file silently replaces the
  model's), through no tuner hook. So, for our adapter type only, the file's keys are read (safetensors
  header, no tensor data) and checked before transformers touches the model, and the loaded values
  are checked after, with the same rollback on a refusal.

The guards wrap these three methods once, at import; for any other adapter type they only pass the
call through.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ..config import PEFT_TYPE, RUNTIME_FIELDS, SharedMoeLoraConfig
from ..factors import EXPERT_FACTORS
from .layer import SharedMoeLoraLayer

# Every key an adapter of ours may hold: expert factors, dense-linear factors, (with a `bias` setting
# other than "none") trainable biases, and the copies of `modules_to_save` modules.
FACTOR_SUFFIXES = tuple(f".{f}.weight" for f in EXPERT_FACTORS) + (".lora_A.weight", ".lora_B.weight")
MODEL_PREFIX = "base_model.model."
# What transformers' load_adapter keeps on the model besides the layers it injects.
TRANSFORMERS_PEFT_ATTRIBUTES = ("peft_config", "_hf_peft_config_loaded")


class AdapterLoadError(ValueError):
    """An adapter refused on load; the message names the file or key and what was expected. Nothing was loaded."""


def is_module_copy(key: str, modules_to_save: Optional[Iterable[str]]) -> bool:
    """A saved `modules_to_save` copy: PEFT writes it under the module's own key (`lm_head.weight`)."""
    module_path = key.removeprefix(MODEL_PREFIX).rpartition(".")[0]
    return any(module_path == name or module_path.endswith("." + name) for name in modules_to_save or ())


def check_adapter_keys(keys: Iterable[str], where: str, bias: str = "none",
                       modules_to_save: Optional[Iterable[str]] = None) -> None:
    """Refuse, naming them, keys that are not LoRA factors, declared trainable biases or module copies."""
    bad = sorted(
        k for k in keys
        if not (k.endswith(FACTOR_SUFFIXES) or (bias != "none" and k.endswith("bias")) or is_module_copy(k, modules_to_save))
    )
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise AdapterLoadError(
            f"{where}: {shown} are not LoRA factors of a {PEFT_TYPE.value} adapter (expected keys ending in "
            f"{FACTOR_SUFFIXES[0]}, ... or .lora_A.weight / .lora_B.weight, or a module listed in modules_to_save); "
            f"loading would overwrite the base model's weights, so nothing was loaded"
        )


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN / Inf values, naming the first keys that hold them."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterLoadError(f"{where}: {', '.join(sorted(bad)[:8])} hold NaN/Inf values; nothing was loaded")


# ---- taking out what a refused load added --------------------------------------------------------


class _Rollback:
    """What `root` holds before a load, so that a refused load of `adapter_name` can be taken out again."""

    def __init__(self, root: nn.Module, adapter_name: str) -> None:
        self.root, self.adapter_name = root, adapter_name
        self.had_adapter = any(_holds(m, adapter_name) for m in root.modules())
        self.requires_grad = {id(p): p.requires_grad for p in root.parameters()}

    def undo(self) -> None:
        if self.had_adapter:
            return  # loading into an existing adapter checks everything before its first write
        for name, module in list(self.root.named_modules()):
            if not _holds(module, self.adapter_name):
                continue
            names = set(module.scaling) if isinstance(module, SharedMoeLoraLayer) else set(module.modules_to_save)
            if names == {self.adapter_name}:  # the load created this wrapper: put the module back
                parent_name, _, child = name.rpartition(".")
                parent = self.root.get_submodule(parent_name) if parent_name else self.root
                setattr(parent, child, module.get_base_layer() if isinstance(module, BaseTunerLayer) else module.original_module)
            elif isinstance(module, SharedMoeLoraLayer):
                module.delete_adapter(self.adapter_name)
            else:
                module.delete_adapter(self.adapter_name, [a for a in module.active_adapters if a != self.adapter_name])
        for param in self.root.parameters():
            if id(param) in self.requires_grad:
                param.requires_grad = self.requires_grad[id(param)]


def _holds(module: nn.Module, adapter_name: str) -> bool:
    if isinstance(module, SharedMoeLoraLayer):
        return adapter_name in module.scaling
    return isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save


def _is_ours(peft_config: Any) -> bool:
    values = peft_config if isinstance(peft_config, dict) else vars(peft_config) if peft_config is not None else {}
    return values.get("peft_type") == PEFT_TYPE


def _wrap(owner: type, name: str, guard: Callable) -> None:
    original = inspect.getattr_static(owner, name)
    function = original.__func__ if isinstance(original, classmethod) else original
    if getattr(function, "_shared_moe_guard", False):
        return
    wrapped = functools.wraps(function)(guard(function, inspect.signature(function)))
    wrapped._shared_moe_guard = True  # type: ignore[attr-defined]
    setattr(owner, name, classmethod(wrapped) if isinstance(original, classmethod) else wrapped)


def _peft_load_adapter_guard(load_adapter: Callable, signature: inspect.Signature) -> Callable:
    def guarded(self, *args, **kwargs):
        adapter_name = signature.bind(self, *args, **kwargs).arguments["adapter_name"]
        had_config = adapter_name in self.peft_config
        rollback = _Rollback(getattr(self.base_model, "model", self.base_model), adapter_name)  # prompt learning: no .model
        try:
            return load_adapter(self, *args, **kwargs)
        except BaseException as error:
            if not had_config and _is_ours(self.peft_config.get(adapter_name)):
                rollback.undo()
                self.peft_config.pop(adapter_name, None)
            if isinstance(error, AdapterLoadError):  # name the adapter's folder, which the tuner's check cannot
                raise AdapterLoadError(f"{signature.bind(self, *args, **kwargs).arguments['model_id']}: {error}") from None
            raise

    return guarded


def _peft_from_pretrained_guard(from_pretrained: Callable, signature: inspect.Signature) -> Callable:
    def guarded(cls, *args, **kwargs):
        arguments = signature.bind(cls, *args, **kwargs).arguments
        model = arguments["model"]
        adapter_name = arguments.get("adapter_name", "default")
        rollback = _Rollback(model, adapter_name)
        try:
            return from_pretrained(cls, *args, **kwargs)
        except BaseException:
            if any(isinstance(m, SharedMoeLoraLayer) and adapter_name in m.scaling for m in model.modules()):
                rollback.undo()  # an adapter of ours was injected; other types are left to PEFT
            raise

    return guarded


# ---- transformers' own loading ----------------------------------------------------------------------


def _file_keys(directory: Path) -> Optional[list[str]]:
    safetensors_file = directory / "adapter_model.safetensors"
    if safetensors_file.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as handle:
            return list(handle.keys())
    pickle_file = directory / "adapter_model.bin"
    if pickle_file.is_file():
        return list(torch.load(pickle_file, map_location="cpu", weights_only=True, mmap=True))
    return None


def _config_of(peft_config: Any, directory: Optional[Path]) -> Optional[dict]:
    if peft_config is not None:
        return peft_config if isinstance(peft_config, dict) else vars(peft_config)
    config_file = directory / "adapter_config.json" if directory is not None else None
    if config_file is not None and config_file.is_file():
        return json.loads(config_file.read_text(encoding="utf-8"))
    return None


class NativeLoad:
    """One call of transformers' `load_adapter` with an adapter of ours: its keys are checked before the
    load (`check_keys`), its values and module copies after (`check_loaded`)."""

    def __init__(self, peft_model_id: Any, peft_config: Any, adapter_state_dict: Any, adapter_kwargs: Any) -> None:
        self.directory = None
        if peft_model_id is not None and Path(str(peft_model_id)).is_dir():
            self.directory = Path(str(peft_model_id)) / ((adapter_kwargs or {}).get("subfolder") or "")
        self.config = _config_of(peft_config, self.directory)
        self.config_from_file = peft_config is None
        self.state_dict = adapter_state_dict
        self.where = "adapter_state_dict" if adapter_state_dict is not None else str(self.directory or peft_model_id)

    @property
    def is_ours(self) -> bool:
        return self.config is not None and self.config.get("peft_type") == PEFT_TYPE

    def keys(self) -> Optional[list[str]]:
        if self.state_dict is not None:
            return list(self.state_dict)
        return _file_keys(self.directory) if self.directory is not None else None

    def check_keys(self) -> None:
        keys = self.keys()
        if keys is not None:
            check_adapter_keys(keys, self.where, self.config.get("bias", "none"), self.config.get("modules_to_save"))

    def check_loaded(self, model: nn.Module, adapter_name: str) -> None:
        """Every value finite, and every module copy really loaded: transformers before 5.2x loads a saved
        `lm_head.weight` copy into nothing, which would leave the copy at the base's values."""
        check_finite({n: p for n, p in model.named_parameters() if adapter_name in n.split(".")}, self.where)
        copies = [k for k in self.keys() or () if is_module_copy(k, self.config.get("modules_to_save"))]
        params = dict(model.named_parameters())
        for key in copies:
            module_path, _, param = key.removeprefix(MODEL_PREFIX).rpartition(".")
            loaded = params.get(f"{module_path}.modules_to_save.{adapter_name}.{param}")
            if loaded is None or not torch.equal(loaded.detach().cpu(), self._tensor(key).to(loaded.dtype)):
                raise AdapterLoadError(
                    f"{self.where}: {key}, a copy of a modules_to_save module, was not loaded by this transformers "
                    f"version's load_adapter; load the adapter with peft.PeftModel.from_pretrained instead"
                )

    def _tensor(self, key: str) -> torch.Tensor:
        if self.state_dict is not None:
            return self.state_dict[key]
        safetensors_file = self.directory / "adapter_model.safetensors"
        if safetensors_file.is_file():
            from safetensors import safe_open

            with safe_open(str(safetensors_file), framework="pt") as handle:
                return handle.get_tensor(key)
        return torch.load(self.directory / "adapter_model.bin", map_location="cpu", weights_only=True, mmap=True)[key]


def _transformers_load_adapter_guard(load_adapter: Callable, signature: inspect.Signature) -> Callable:
    def guarded(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        native = NativeLoad(arguments.get("peft_model_id"), arguments.get("peft_config"),
                            arguments.get("adapter_state_dict"), arguments.get("adapter_kwargs"))
        if not native.is_ours:
            return load_adapter(self, *args, **kwargs)
        native.check_keys()
        adapter_name = arguments.get("adapter_name") or "default"
        rollback = _Rollback(self, adapter_name)
        # transformers sets a flag and adds the config to `self.peft_config` (a dict it creates on a first load)
        attributes_before = {k: vars(self)[k] for k in TRANSFORMERS_PEFT_ATTRIBUTES if k in vars(self)}
        if "peft_config" in attributes_before:
            attributes_before["peft_config"] = dict(attributes_before["peft_config"])  # its contents: it is mutated
        try:
            result = load_adapter(self, *args, **kwargs)
            native.check_loaded(self, adapter_name)
            if native.config_from_file:
                _run_time_defaults(self, adapter_name)
            return result
        except BaseException:
            rollback.undo()
            for key in TRANSFORMERS_PEFT_ATTRIBUTES:
                vars(self).pop(key, None)
            vars(self).update(attributes_before)
            raise

    return guarded


def _run_time_defaults(model: nn.Module, adapter_name: str) -> None:
    """An adapter config read by transformers' loader (PEFT's base `PeftConfig.from_pretrained`, which our
    config class cannot hook) keeps a run-time field an older file may hold: reset it to the default."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    for name in RUNTIME_FIELDS:
        default = SharedMoeLoraConfig.__dataclass_fields__[name].default
        if config is not None:
            setattr(config, name, default)
        for module in model.modules():
            if isinstance(module, SharedMoeLoraLayer) and adapter_name in getattr(module, name, {}):
                getattr(module, name)[adapter_name] = default


def install_loading_guards() -> None:
    from peft import PeftModel
    from transformers.integrations.peft import PeftAdapterMixin

    _wrap(PeftModel, "from_pretrained", _peft_from_pretrained_guard)
    _wrap(PeftModel, "load_adapter", _peft_load_adapter_guard)
    _wrap(PeftAdapterMixin, "load_adapter", _transformers_load_adapter_guard)
