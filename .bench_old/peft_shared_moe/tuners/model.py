"""`SharedMoeLoraModel`: PEFT's tuner for shared-outer MoE LoRA — which modules to wrap, and the saved key layout."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..config import EXPERTS_TARGET, SharedMoeLoraConfig
from .layer import EXPERT_FACTOR_KEYS, ExpertsLoraLayer, LinearLoraLayer, SharedMoeLoraLayer, is_fused_experts


def find_targets(model: nn.Module, config: SharedMoeLoraConfig) -> dict[str, str]:
    """Module name -> "experts" or "linear" for every module the config adapts.

    Raises before anything is wrapped when a target name matches nothing, matches a module of
    an unsupported type, or "experts" is asked of a model without a fused experts block.
    """
    names = config.resolved_target_modules()
    linear_names = [n for n in names if n != EXPERTS_TARGET]
    targets: dict[str, str] = {}
    matched: set[str] = set()
    inside_adapter: list[str] = []
    for key, module in model.named_modules():
        if any(key.startswith(prefix) for prefix in inside_adapter):
            continue
        if isinstance(module, BaseTunerLayer):
            inside_adapter.append(key + ".")
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if EXPERTS_TARGET in names and is_fused_experts(base):
            targets[key] = "experts"
            matched.add(EXPERTS_TARGET)
            continue
        hits = [n for n in linear_names if key == n or key.endswith("." + n)]
        if not hits:
            continue
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"target {hits[0]!r} matched module {key!r} of type {type(base).__name__}; expected an nn.Linear "
                f"(or use 'experts' for a fused experts block)"
            )
        targets[key] = "linear"
        matched.update(hits)
    if EXPERTS_TARGET in names and EXPERTS_TARGET not in matched:
        raise ValueError(
            f"target 'experts' was asked for, but {type(model).__name__} has no fused experts block "
            f"(a module with gate_up_proj [E, 2I, H], down_proj [E, H, I] and act_fn)"
        )
    unmatched = [n for n in names if n not in matched]
    if unmatched:
        raise ValueError(f"target_modules {unmatched} matched no module of {type(model).__name__}")
    return targets


def _expected_adapter_shapes(model: nn.Module, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """Model key -> shape of every LoRA factor of `adapter_name`."""
    own = (f".{adapter_name}.", f".{adapter_name}")
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if ".lora_" in k and (own[0] in k or k.endswith(own[1]))
    }


class SharedMoeLoraModel(BaseTuner):
    """Wraps fused experts blocks in `ExpertsLoraLayer` and linears in `LinearLoraLayer`.

    Factors live under descriptive names (`lora_gate_A`, ...); `_remove_adapter_name_from_key`
    maps them to the serving layout (`w1.lora_A.weight`, ...), and PEFT inverts that map on load.
    """

    prefix: str = "lora_"
    tuner_layer_cls = SharedMoeLoraLayer
    target_module_mapping: dict = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        self._targets = find_targets(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _check_target_module_exists(self, peft_config: SharedMoeLoraConfig, key: str) -> bool:
        return key in getattr(self, "_targets", {})

    def _prepare_adapter_config(self, peft_config: SharedMoeLoraConfig, model_config: dict) -> SharedMoeLoraConfig:
        return peft_config  # targets are resolved structurally in `find_targets`

    def _create_and_replace(
        self,
        peft_config: SharedMoeLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, SharedMoeLoraLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if any(p.device.type == "meta" for p in target.parameters()):
            raise ValueError(
                f"{current_key}: its base weights are offloaded (on the meta device, e.g. device_map 'cpu' or "
                f"'disk' beside a GPU); adapters need every targeted layer resident on a device"
            )
        kind = self._targets[current_key]
        layer_cls = ExpertsLoraLayer if kind == "experts" else LinearLoraLayer
        new_module = layer_cls(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Our layers are built on their base layer's device already; only the attribute swap is left
        # (PEFT's version assumes a `.weight`, which experts blocks do not have).
        setattr(parent, child_name, new_module)

    # ---- saved key layout -------------------------------------------------------------------

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        parts = key.rsplit(".", 2)
        if len(parts) >= 2 and parts[-1] == adapter_name and parts[-2] in EXPERT_FACTOR_KEYS:
            module = parts[0] + "." if len(parts) == 3 else ""
            return f"{module}{EXPERT_FACTOR_KEYS[parts[-2]]}.weight"
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SharedMoeLoraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        cls.check_adapter_state_dict(model, adapter_name, remapped)
        return remapped

    @classmethod
    def check_adapter_state_dict(cls, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Refuse, before any weight is written, an adapter whose keys or shapes do not fit the model.

        `state_dict` has model keys; errors name the checkpoint keys, which is what the user has.
        """
        expected = _expected_adapter_shapes(model, adapter_name)
        saved_name = lambda key: cls._remove_adapter_name_from_key(key, adapter_name)  # noqa: E731
        problems = []
        for key, tensor in state_dict.items():
            if key in expected:
                if tuple(tensor.shape) != expected[key]:
                    problems.append(
                        f"{saved_name(key)}: expected shape {list(expected[key])}, found {list(tensor.shape)}"
                    )
            elif ".lora_" in key:
                problems.append(f"{key}: no such adapter tensor in the model (unknown key, or a layer/target mismatch)")
        missing = sorted(saved_name(k) for k in expected if k not in state_dict)
        if missing:
            problems.append(f"missing from the adapter: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if problems:
            raise ValueError(f"adapter {adapter_name!r} does not fit the model:\n  " + "\n  ".join(problems))
