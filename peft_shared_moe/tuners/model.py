"""`SharedMoeLoraModel`: PEFT's tuner for shared-outer MoE LoRA — which modules to wrap, and the saved key layout."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from ..config import ATTENTION_TARGET, EXPERTS_TARGET, SharedMoeLoraConfig
from ..ops import UnsupportedExpertsError, describe_experts
from ..parallel import (
    ParallelLayoutError,
    average_grads_over,
    broadcast_replicas,
    data_parallel_mesh,
    distribute_tensor,
    experts_sharding,
    gather_for_save,
    is_dtensor,
    linear_sharding,
    local,
    model_parallel_mesh,
    recast_parameter,
)
from .layer import BASE_NAME, ExpertsLoraLayer, LinearLoraLayer, SharedMoeLoraLayer
from .loading import AdapterLoadError, check_finite


def find_targets(model: nn.Module, config: SharedMoeLoraConfig) -> dict[str, str]:
    """Module name -> "experts" or "linear" for every module the config adapts.

    Raises before anything is wrapped when a target name matches nothing, matches a module of
    an unsupported type, or "experts" is asked of a model without a fused experts block. Works on a
    model built on the meta device (the formats describe a base that way).
    """
    names = config.resolved_target_modules()
    linear_names = [n for n in names if n not in (EXPERTS_TARGET, ATTENTION_TARGET)]
    attention = attention_projections(model) if ATTENTION_TARGET in names else set()
    targets: dict[str, str] = {}
    split: dict[str, bool] = {}  # target -> split over ranks by tensor / expert parallelism
    matched: set[str] = set()
    inside_adapter: list[str] = []
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output_embeddings = get_output_embeddings() if callable(get_output_embeddings) else None
    for key, module in model.named_modules():
        if any(key.startswith(prefix) for prefix in inside_adapter):
            continue
        if isinstance(module, BaseTunerLayer):
            inside_adapter.append(key + ".")
        if not config.in_selected_layers(key):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if EXPERTS_TARGET in names and (sharded := _experts_sharded(key, base)) is not None:
            targets[key], split[key] = "experts", sharded
            matched.add(EXPERTS_TARGET)
            continue
        hits = [n for n in linear_names if key == n or key.endswith("." + n)]
        if key in attention:
            hits.append(ATTENTION_TARGET)
        if not hits:
            continue
        if base is output_embeddings:
            raise ValueError(
                f"target {hits[0]!r} matched {key!r}, the output embeddings (lm_head): serving engines' LoRA formats "
                f"and PEFT's tied-weights handling treat it apart, so it is not supported; target the decoder layers"
            )
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"target {hits[0]!r} matched module {key!r} of type {type(base).__name__}; expected an nn.Linear "
                f"(or use 'experts' for a fused experts block)"
            )
        targets[key], split[key] = "linear", _linear_sharded(key, base, config)
        matched.update(hits)
    where = type(model).__name__
    if config.layers_to_transform is not None:
        where += f" in the layers layers_to_transform={config.layers_to_transform} selects"
    if EXPERTS_TARGET in names and EXPERTS_TARGET not in matched:
        raise ValueError(
            f"target 'experts' was asked for, but {where} has no fused experts block "
            f"(a module with gate_up_proj [E, 2I, H], down_proj [E, H, I] and act_fn)"
        )
    unmatched = [n for n in names if n not in matched]
    if unmatched:
        raise ValueError(f"target_modules {unmatched} matched no module of {where}")
    _check_whole_targets(model, targets, split, config)
    return targets


def _refuse_offloaded(model: nn.Module, targets: dict[str, str]) -> None:
    """Before any layer is wrapped: every target's weights must be resident (accelerate leaves an
    offloaded layer's weights on the meta device until its forward)."""
    offloaded = [k for k in targets if any(p.device.type == "meta" for p in model.get_submodule(k).parameters())]
    if offloaded:
        raise ValueError(
            f"{offloaded[0]}: its base weights are offloaded (on the meta device, e.g. device_map 'cpu' or 'disk' "
            f"beside a GPU); adapters need every targeted layer resident on a device"
        )


def attention_projections(model: nn.Module) -> set[str]:
    """Paths of the linears directly inside the decoder's attention blocks (classes named *Attention, or
    *MLA for multi-head latent attention), whatever the architecture calls them; a vision tower's
    attention (outside `get_decoder()`) is not one."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    decoder = decoder if isinstance(decoder, nn.Module) else model
    prefix = next((f"{k}." if k else "" for k, m in model.named_modules() if m is decoder), "")
    found = set()
    for key, module in decoder.named_modules():
        if isinstance(module, BaseTunerLayer) or not type(module).__name__.endswith(("Attention", "MLA")):
            continue
        for child_name, child in module.named_children():
            base = child.get_base_layer() if isinstance(child, BaseTunerLayer) else child
            if isinstance(base, nn.Linear):
                found.add(f"{prefix}{key}.{child_name}" if key else f"{prefix}{child_name}")
    return found


def _check_whole_targets(model: nn.Module, targets: dict[str, str], split: dict[str, bool],
                         config: SharedMoeLoraConfig) -> None:
    """In a tensor / expert parallel model, targets the plan leaves whole (transformers >= 5.25 leaves the
    experts whole under tensor parallelism) run on the same batch on every rank, unless FSDP alone shards
    them: their factors are replicas, which must stay identical."""
    if not any(split.values()) and model_parallel_mesh(model) is None:
        return
    whole = [k for k in targets if not split[k]]
    if whole and config.lora_dropout and data_parallel_mesh(model) is None:
        raise ParallelLayoutError(
            f"cannot adapt {whole[0]!r}: lora_dropout={config.lora_dropout} on a linear every rank runs on the same "
            f"batch would drop different inputs on each rank, and the replicas would part; use lora_dropout=0"
        )


def _experts_sharded(key: str, module: nn.Module) -> Optional[bool]:
    """None: not an experts block we adapt; else whether it is split over ranks (raises for one we refuse)."""
    try:
        layout = describe_experts(module)
        if layout is None:
            return None
        return experts_sharding(module, layout.transposed, not layout.interleaved) is not None
    except UnsupportedExpertsError as error:
        raise UnsupportedExpertsError(f"cannot adapt {key!r}: {error}") from None
    except ParallelLayoutError as error:
        raise ParallelLayoutError(f"cannot adapt {key!r}: {error}") from None


def _linear_sharded(key: str, linear: nn.Linear, config: SharedMoeLoraConfig) -> bool:
    """Whether a target linear is split over ranks; raises for a split or a dropout we cannot follow."""
    try:
        sharding = linear_sharding(linear)
    except ParallelLayoutError as error:
        raise ParallelLayoutError(f"cannot adapt {key!r}: {error}") from None
    if sharding is not None and sharding.style == "colwise" and config.lora_dropout:
        # Each rank would draw its own mask on the replicated input: the shards would disagree.
        raise ParallelLayoutError(
            f"cannot adapt {key!r}: lora_dropout={config.lora_dropout} on a column-parallel linear would drop "
            f"different inputs on each rank; use lora_dropout=0 under tensor parallelism"
        )
    return sharding is not None


def shard_like_model(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from a file -> DTensors placed like the model's parameters of the same keys
    (rank 0's values, so every replica is identical); other values pass through."""
    params = dict(model.named_parameters())
    placed = {}
    for key, value in state_dict.items():
        param = params.get(key)
        if param is not None and is_dtensor(param) and not is_dtensor(value):
            value = distribute_tensor(
                value.to(device=local(param).device, dtype=param.dtype).contiguous(), param.device_mesh,
                param.placements, src_data_rank=0,
            )
        placed[key] = value
    return placed


def _align_replicas(model: nn.Module, adapter_name: str) -> None:
    """In a parallel model every replica starts from rank 0's values and takes the same steps.

    Under tensor / expert parallelism every factor is a DTensor (placed from rank 0), a target the plan
    leaves whole included (docs/PARALLEL.md):
    - tensor parallel (alone or on an (fsdp, tp) mesh): the TP ranks run a whole target on the same batch,
      so its factors are replicated over the TP mesh, each rank computing their full gradient; the FSDP
      ranks of a 2D mesh start alike and average their gradients;
    - expert parallel with FSDP (`fsdp_size` + `ep_size`): a whole linear is an FSDP shard and every rank
      has its own batch: replicated over the FSDP mesh, gradients averaged;
    - expert parallel alone (transformers 5.17): attention is whole on every rank, on the same batch.
    Under FSDP alone (transformers' `fsdp_size`, which shards the model before the adapter exists and so
    never manages it) the factors stay plain tensors, broadcast, with averaged gradients.
    """
    layers = [m for m in model.modules() if isinstance(m, SharedMoeLoraLayer) and adapter_name in m.scaling]
    split = [m.sharding for m in layers if m.sharding is not None and m.sharding.splits_compute]
    tensor_parallel = [s for s in split if not s.expert_parallel]
    if tensor_parallel:
        mesh, data_mesh = tensor_parallel[0].mesh, tensor_parallel[0].data_mesh
    elif split:
        mesh, data_mesh = split[0].mesh, None
    else:
        mesh, data_mesh = model_parallel_mesh(model) or (None, None)
    dense_fsdp_mesh = data_parallel_mesh(model)
    if mesh is None:
        if dense_fsdp_mesh is not None:
            plain = [p for m in layers for p in m.factor_params(adapter_name).values()]
            broadcast_replicas(plain, dense_fsdp_mesh)
            average_grads_over(plain, dense_fsdp_mesh)
        return
    for layer in layers:
        if layer.sharding is not None:
            continue
        if not tensor_parallel and dense_fsdp_mesh is not None:  # expert parallel with FSDP
            layer.replicate_on(dense_fsdp_mesh)
            layer.sharding = replace(layer.sharding, data_mesh=dense_fsdp_mesh, data_divisor=dense_fsdp_mesh.size())
        else:
            layer.replicate_on(mesh)
            if data_mesh is not None:
                layer.sharding = replace(layer.sharding, data_mesh=data_mesh, data_divisor=data_mesh.size())
    for layer in layers:
        if layer.sharding.data_mesh is not None:
            factors = list(layer.factor_params(adapter_name).values())
            broadcast_replicas(factors, layer.sharding.data_mesh)
            average_grads_over(factors, layer.sharding.data_mesh, layer.sharding.data_divisor)


def _expected_adapter_shapes(model: nn.Module, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """Model key -> shape of every tensor `adapter_name` owns: its LoRA factors and its copies of the
    `modules_to_save` modules (PEFT's `ModulesToSaveWrapper`)."""
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, SharedMoeLoraLayer):
            owned = {n: p for n, p in module.named_parameters() if n.endswith(f".{adapter_name}.weight")}
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            owned = dict(module.modules_to_save[adapter_name].state_dict(prefix=f"modules_to_save.{adapter_name}."))
        else:
            continue
        expected.update({f"{name}.{k}": tuple(v.shape) for k, v in owned.items()})
    return expected


class SharedMoeLoraModel(BaseTuner):
    """Wraps fused experts blocks in `ExpertsLoraLayer` and linears in `LinearLoraLayer`.

    Factors live at their saved names (`experts.w1.lora_A[adapter].weight`), so PEFT's own key
    mapping saves and loads the serving layout; `check_adapter_state_dict` refuses anything else.
    """

    prefix: str = "lora_"
    tuner_layer_cls = SharedMoeLoraLayer
    target_module_mapping: dict = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        self._targets = find_targets(model, config)
        _refuse_offloaded(model, self._targets)
        # PEFT rewrites a target_modules of "all-linear" into the paths of every linear (dropping "experts")
        # and shortens long lists; it matches through `_check_target_module_exists`, so it gets the resolved
        # names, and the config keeps what the user gave (which is saved, and resolved again on load).
        given = config.target_modules
        config.target_modules = config.resolved_target_modules()
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            config.target_modules = given
        _align_replicas(model, adapter_name)

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

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT upcasts half-precision factors to float32 with `param.data = param.data.float()`, which on a
        # DTensor changes its declared dtype but not its local shard's (the optimizer then fails on mixed
        # dtypes). Our factors are cast here by replacing the parameter, which is right for both kinds.
        if autocast_adapter_dtype:
            for layer in self.model.modules():
                if isinstance(layer, SharedMoeLoraLayer) and adapter_name in layer.scaling:
                    for name in layer.adapter_layer_names:
                        holder = getattr(layer, name)[adapter_name]
                        if holder.weight.dtype in (torch.float16, torch.bfloat16):
                            holder.weight = recast_parameter(holder.weight, torch.float32)
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    # ---- trainable biases (bias="all" / "lora_only", as LoraConfig) ---------------------------

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        if any(getattr(self.peft_config[a], "bias", "none") == "lora_only" for a in self.active_adapters):
            for _, param in _lora_only_biases(model):
                param.requires_grad = True

    @classmethod
    def _get_learnable_bias_state_dict(
        cls, model: nn.Module, state_dict: dict[str, torch.Tensor], config: SharedMoeLoraConfig
    ) -> dict[str, torch.Tensor]:
        selected = super()._get_learnable_bias_state_dict(model, state_dict, config)
        if getattr(config, "bias", "none") == "lora_only":
            selected.update({k: state_dict[k] for k, _ in _lora_only_biases(model) if k in state_dict})
        return selected

    # ---- forward arguments --------------------------------------------------------------------

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """`model(..., adapter_names=[...])` / `generate(...)`: one adapter name per sample ("__base__": none),
        handed to every adapter layer for the length of the call, as PEFT's LoRA does."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names=[...] is for inference: call model.eval() first (training mixes "
                             "no adapters per sample)")
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per sample, got {adapter_names!r}")
        known = {name for layer in self.model.modules() if isinstance(layer, SharedMoeLoraLayer) for name in layer.scaling}
        unknown = sorted(set(adapter_names) - known - {BASE_NAME})
        if unknown:
            raise ValueError(f"adapter_names names unknown adapter(s) {unknown}; loaded: {sorted(known)} (or {BASE_NAME!r})")
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if isinstance(inputs, torch.Tensor) and inputs.shape[0] != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} names but the batch has {inputs.shape[0]} "
                             f"samples: one name per sample")
        beams = kwargs.get("num_beams")
        names = [n for n in adapter_names for _ in range(beams)] if isinstance(beams, int) and beams > 1 else list(adapter_names)

        def hand_names(module, args, kwargs):
            return args, {**kwargs, "adapter_names": names}

        # PEFT's modules_to_save copies take the names too, as under PEFT's LoRA
        takes_names = (SharedMoeLoraLayer, AuxiliaryTrainingWrapper)
        handles = [layer.register_forward_pre_hook(hand_names, with_kwargs=True)
                   for layer in self.model.modules() if isinstance(layer, takes_names)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ---- merging: every layer is checked before any base weight changes ----------------------

    def _check_all_merges(self, adapter_names: Optional[list[str]], safe_merge: bool) -> None:
        """Every layer that would merge is checked before the first write: a quantized base refuses, and
        with safe_merge every layer's merged weights are computed aside (and dropped) first, so a
        non-finite result in any layer raises then too."""
        layers = [m for m in self.model.modules() if isinstance(m, SharedMoeLoraLayer)]
        for module in layers:
            if module._to_merge(adapter_names):
                module.check_mergeable()
        if not safe_merge:
            return
        for module in layers:
            names = module._to_merge(adapter_names)  # the ones not merged there yet
            if names:
                module.merged_values(names, safe_merge=True)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_merge_allowed()
        self._check_all_merges(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None):
        if merge:
            self._check_merge_allowed()
            self._check_all_merges(adapter_names, safe_merge)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    # ---- combining adapters ------------------------------------------------------------------

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "cat"
    ) -> None:
        """A new adapter from existing ones, with PEFT's `LoraModel.add_weighted_adapter` semantics.

        "cat" is exact: ranks add up and the delta is sum_i w_i * delta_i. "linear" averages the
        factors themselves (A = sum sqrt(w_i s_i) A_i, likewise B), which needs equal ranks and is
        not the weighted sum of the deltas. The new adapter has scaling 1 (lora_alpha = r).
        """
        if combination_type not in COMBINATION_TYPES:
            raise NotImplementedError(
                f"combination_type={combination_type!r} is not supported by SHARED_MOE_LORA; use one of {COMBINATION_TYPES}"
            )
        missing = [a for a in adapters if a not in self.peft_config]
        if not adapters or missing or len(weights) != len(adapters):
            raise ValueError(
                f"add_weighted_adapter needs existing adapters and one weight each; unknown {missing}, "
                f"{len(adapters)} adapters and {len(weights)} weights"
            )
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        configs = [self.peft_config[a] for a in adapters]
        ranks = [c.r for c in configs]
        if combination_type == "linear" and len(set(ranks)) > 1:
            raise ValueError(f"combination_type='linear' needs adapters of one rank, got ranks {ranks}")
        if combination_type == "linear" and any(w * c.scaling < 0 for w, c in zip(weights, configs)):
            raise ValueError("combination_type='linear' takes the square root of weight * scaling: weights must be >= 0")
        new_rank = sum(ranks) if combination_type == "cat" else ranks[0]
        targets: list[str] = []
        for config in configs:
            targets += [t for t in config.resolved_target_modules() if t not in targets]
        self.peft_config[adapter_name] = replace(
            configs[0], r=new_rank, lora_alpha=new_rank, use_rslora=False, target_modules=targets,
            shared_outer=all(c.shared_outer for c in configs),
        )
        self.inject_adapter(self.model, adapter_name)
        for module in self.model.modules():
            if isinstance(module, SharedMoeLoraLayer) and adapter_name in module.scaling:
                module.set_weighted_factors(adapter_name, adapters, weights, combination_type)
        self.set_adapter(self.active_adapters)

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SharedMoeLoraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # A refusal raises before any tensor is written; the loading guards (loading.py) then take out
        # the layers the refused load injected.
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        cls.check_adapter_state_dict(model, adapter_name, remapped, config)
        return shard_like_model(model, remapped)

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config, adapter_name: str, state_dict, unwanted_adapter_names):
        # A file holds whole tensors, whatever the parallelism (FSDP2, TP, EP): sharded factors are gathered.
        # Every rank must call save_pretrained (is_main_process picks the writer); one that saves alone gets
        # IncompleteSaveError after a short wait instead of blocking in the gather.
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # PEFT drops another adapter's tensors when its name follows a tuner attribute (`lora_A.<name>`); an experts
        # factor's name follows two (`w1.lora_A.<name>`), so the other adapters' factors are dropped here.
        selected = {k: v for k, v in selected.items() if ".lora_" not in k or k.split(".")[-2] == adapter_name}
        return gather_for_save(selected)

    @classmethod
    def check_adapter_state_dict(
        cls,
        model: nn.Module,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        config: Optional[SharedMoeLoraConfig] = None,
    ) -> None:
        """Refuse, before any weight is written, an adapter that is not exactly this adapter's tensors.

        Every key must be a factor or a `modules_to_save` copy of `adapter_name` with its shape (or,
        with `bias` other than "none", a trainable bias), every one must be there, and every value
        finite. `state_dict` has model keys; errors name the checkpoint keys, which is what the user has.
        """
        expected = _expected_adapter_shapes(model, adapter_name)
        biases = _trainable_bias_names(model, getattr(config, "bias", "none"))
        saved_name = lambda key: cls._remove_adapter_name_from_key(key, adapter_name)  # noqa: E731
        problems = []
        for key, tensor in state_dict.items():
            if key in expected:
                if tuple(tensor.shape) != expected[key]:
                    problems.append(
                        f"{saved_name(key)}: expected shape {list(expected[key])}, found {list(tensor.shape)}"
                    )
            elif _strip_model_prefix(key) not in biases:
                problems.append(
                    f"{saved_name(key)}: not a tensor of this adapter (an adapter holds only the LoRA factors of its "
                    f"target modules and copies of its modules_to_save; base weights and unknown keys are refused)"
                )
        missing = sorted(saved_name(k) for k in expected if k not in state_dict)
        if missing:
            problems.append(f"missing from the adapter: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if problems:
            raise AdapterLoadError(
                f"adapter {adapter_name!r} does not fit the model; nothing was loaded:\n  " + "\n  ".join(problems)
            )
        check_finite({saved_name(k): v for k, v in state_dict.items()}, f"adapter {adapter_name!r}")


COMBINATION_TYPES = ("cat", "linear")


def _strip_model_prefix(key: str) -> str:
    return key[len("base_model.model."):] if key.startswith("base_model.model.") else key


def _lora_only_biases(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(state-dict key, parameter) of the biases of every adapted base layer."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, SharedMoeLoraLayer):
            for pname, param in module.get_base_layer().named_parameters(recurse=False):
                if pname == "bias" or pname.endswith("_bias"):
                    found.append((f"{name}.base_layer.{pname}", param))
    return found


def _trainable_bias_names(model: nn.Module, bias: str) -> set[str]:
    if bias == "all":
        return {_strip_model_prefix(k) for k, _ in model.named_parameters() if k == "bias" or k.endswith("bias")}
    if bias == "lora_only":
        return {_strip_model_prefix(k) for k, _ in _lora_only_biases(model)}
    return set()
