"""Adapter layers: LoRA on a fused experts block, and ordinary LoRA on an `nn.Linear`.

The layers hold state (factors per adapter name) and PEFT bookkeeping (active, disabled, merged);
all experts math is in `peft_shared_moe.ops`.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
import torch.nn.functional as F
from torch import nn

from ..config import SharedMoeLoraConfig
from ..factors import EXPERT_FACTORS, PROJECTIONS, factor_shape, fan_in
from ..ops import AdapterCall, ExpertLoraFactors, describe_experts, mixed_linear_lora, run_experts, run_mixed_experts
from ..ops.quantized import QuantizedExpertWeights
from ..parallel import (
    ParallelLayoutError,
    Sharding,
    SumGradOver,
    SumOver,
    experts_sharding,
    is_data_parallel_shard,
    is_dtensor,
    linear_sharding,
    local,
)

def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers fused experts block that this library adapts (raises for one it refuses)."""
    return describe_experts(module) is not None


def _uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    # Kaiming-uniform with a = sqrt(5), as PEFT's LoRA initialises A: bound 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def _init_factor(weight: torch.Tensor, is_a: bool, fan_in: int, config: SharedMoeLoraConfig) -> None:
    """PEFT's LoRA initialisation: B zero (a fresh adapter is the identity), A Kaiming-uniform or, with
    "gaussian", N(0, 1/r); init_lora_weights=False draws B like A."""
    if not is_a and config.init_lora_weights is not False:
        nn.init.zeros_(weight)
    elif is_a and config.init_lora_weights == "gaussian":
        with torch.no_grad():
            weight.normal_(0.0, 1.0 / config.r)
    else:
        _uniform_(weight, fan_in)


def _storage(base: nn.Module, param_name: str) -> torch.Tensor:
    """A base parameter's data, as this rank's shard when it is a DTensor: merges write shard by shard."""
    return local(getattr(base, param_name).data)


BASE_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names
_FACTOR_PATHS = tuple((f, tuple(f.split("."))) for f in EXPERT_FACTORS)  # "w1.lora_A" -> ("w1", "lora_A")


def _fresh_output(base: nn.Module, result: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `result` is a new tensor nobody else holds: the output of a plain `nn.Linear` that no
    forward hook could have kept or replaced. Only then may a delta be added into it in place."""
    from torch.nn.modules import module as torch_module

    return (type(base) is nn.Linear and not base._forward_hooks and not torch_module._global_forward_hooks
            and result._base is None and result.data_ptr() != x.data_ptr())


def _check_adapter_name(adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == BASE_NAME:
        raise ValueError(f"adapter name must be a non-empty string without '.', not {BASE_NAME!r} (it means no "
                         f"adapter in adapter_names), got {adapter_name!r}")


class SharedMoeLoraLayer(BaseTunerLayer):
    """What both adapter layers share: scaling bookkeeping, and merge / unmerge through deltas."""

    other_param_names = ("r", "lora_alpha", "scaling")

    def _init_bookkeeping(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    def _record_scaling(self, adapter_name: str, config: SharedMoeLoraConfig) -> None:
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling

    def delta_by_base_param(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The full-rank update each base parameter receives when `adapter_name` is merged."""
        raise NotImplementedError

    def _to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        # Adapters that do not sit on this layer are skipped: an adapter may target other layers only.
        return [a for a in check_adapters_to_merge(self, adapter_names) if a in self.scaling]

    def merged_values(self, adapter_names: list[str], safe_merge: bool) -> dict[str, torch.Tensor]:
        """The base parameters after merging `adapter_names`, computed aside; raises before any write."""
        self.check_mergeable()
        base = self.get_base_layer()
        sharded_by_fsdp = [n for n, p in base.named_parameters(recurse=False) if is_data_parallel_shard(p)]
        if sharded_by_fsdp:
            raise ValueError(
                f"cannot merge into {type(base).__name__}: {sharded_by_fsdp} are FSDP shards (the layer's weights "
                f"are whole only inside its forward); merge on a model loaded without fsdp_size, or save the adapter "
                f"and merge offline (peft-shared-moe merge)"
            )
        merged: dict[str, torch.Tensor] = {}
        for name in adapter_names:
            for p, delta in self.delta_by_base_param(name).items():
                current = merged.get(p, _storage(base, p))
                merged[p] = current + delta.to(current.dtype)
        if safe_merge:
            broken = [p for p, t in merged.items() if not torch.isfinite(t).all()]
            if broken:
                raise ValueError(
                    f"merging adapter(s) {adapter_names} would make {broken} non-finite; nothing was merged"
                )
        return merged

    def check_mergeable(self) -> None:
        """Raise where a merge cannot write the base: one held quantized (it would re-quantize the sum),
        ours or another library's (an FP8 / int weight)."""
        base = self.get_base_layer()
        held = {n: getattr(base, n, None) for n in ("weight", "gate_up_proj", "down_proj")}
        quantized = {n: w.scheme if isinstance(w, QuantizedExpertWeights) else str(w.dtype) for n, w in held.items()
                     if isinstance(w, QuantizedExpertWeights)
                     or (isinstance(w, torch.Tensor) and not (w.is_floating_point() and w.element_size() > 1))}
        if quantized:
            raise ValueError(
                f"cannot merge into {type(base).__name__}: {sorted(quantized)} are held quantized "
                f"({', '.join(sorted(set(quantized.values())))}), and merging would re-quantize the sum; merge onto "
                f"the bf16 base instead (the saved adapter loads onto it unchanged), e.g. `peft-shared-moe merge`"
            )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = self._to_merge(adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for p, value in self.merged_values(adapter_names, safe_merge).items():
            _storage(base, p).copy_(value)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            for p, delta in self.delta_by_base_param(name).items():
                storage = _storage(base, p)
                storage -= delta.to(storage.dtype)

    def _local_factor(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor the math uses: this rank's shard under tensor / expert parallelism (parallel.py)."""
        return param if self.sharding is None else local(param)

    def _active_here(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.scaling]

    def _check_mixed_batch(self) -> None:
        if self.merged:
            raise ValueError("adapter_names=[...] with merged adapters: call unmerge_adapter() first")
        if self.sharding is not None:
            raise ValueError("adapter_names=[...] is not supported on a tensor / expert parallel model")

    def _rows_by_adapter(self, adapter_names: list[str], rows_per_name: int, device) -> list[tuple[str, torch.Tensor]]:
        """(name, row indices) per name used, first use first; names not on this layer and
        "__base__" are grouped under "__base__" (no adapter here). Rows are sample-major."""
        groups: dict[str, list[int]] = {}
        for sample, name in enumerate(adapter_names):
            key = name if name in self.scaling else BASE_NAME
            groups.setdefault(key, []).extend(range(sample * rows_per_name, (sample + 1) * rows_per_name))
        return [(name, torch.tensor(rows, dtype=torch.long, device=device)) for name, rows in groups.items()]

    def replicate_on(self, mesh) -> None:
        """A module the parallel plan leaves whole, in a tensor / expert parallel model: every rank runs it in
        full, so its factors become replicated DTensors on `mesh` (rank 0's values), like every other factor
        of the model, so one optimizer steps them all (torch's multi-tensor kernels refuse plain tensors
        beside DTensors). Each rank computes their full gradient; nothing is summed over `mesh`."""
        self.sharding = Sharding(mesh, {}, "replicated")
        for adapter_name in self.scaling:
            for name in self.adapter_layer_names:
                holder = getattr(self, name)[adapter_name]
                if not is_dtensor(holder.weight):
                    placed = self.sharding.distribute(name, holder.weight.detach())
                    holder.weight = nn.Parameter(placed, requires_grad=holder.weight.requires_grad)

    def factor_params(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Factor name (ending in lora_A / lora_B) -> this adapter's parameter on this layer."""
        return {name: getattr(self, name)[adapter_name].weight for name in self.adapter_layer_names}

    def set_weighted_factors(
        self, adapter_name: str, sources: list[str], weights: list[float], combination_type: str
    ) -> None:
        """Fill `adapter_name` (scaling 1) from `sources`, as PEFT's add_weighted_adapter does.

        "cat": A_i scaled by w_i s_i and stacked along the rank, B_i stacked, so the delta is
        exactly sum_i w_i s_i B_i A_i. "linear": A = sum_i sqrt(w_i s_i) A_i, likewise B.
        Sources absent from this layer count as zero.
        """
        present = [(a, w * self.scaling[a]) for a, w in zip(sources, weights) if a in self.scaling]
        # Sources and result are split alike (never along the rank), so this works on local shards.
        with torch.no_grad():
            for name, param in self.factor_params(adapter_name).items():
                param = self._local_factor(param)
                param.zero_()
                rank_dim = param.dim() - (2 if name.endswith("lora_A") else 1)
                parts = []
                for source, coef in present:
                    tensor = self._local_factor(self.factor_params(source)[name]).to(param.dtype)
                    if combination_type == "cat":
                        parts.append(tensor * coef if name.endswith("lora_A") else tensor)
                    else:
                        parts.append(tensor * math.sqrt(coef))
                    if param.dim() == 3:  # a shared factor joining per-expert ones is copied per expert
                        parts[-1] = parts[-1].expand(param.shape[0], *tensor.shape[1:])
                if not parts:
                    continue
                combined = torch.cat(parts, dim=rank_dim) if combination_type == "cat" else sum(parts)
                param.narrow(rank_dim, 0, combined.shape[rank_dim]).copy_(combined)


class ExpertFactor(nn.Module):
    """One 3D factor of one adapter. A module, so its key ends in `.weight` like every LoRA factor."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class ProjectionLora(nn.Module):
    """The `lora_A` and `lora_B` of one expert projection (w1, w3 or w2), one `ExpertFactor` per adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()


class ExpertsLoraLayer(nn.Module, SharedMoeLoraLayer):
    """LoRA on a fused experts block, shared-outer or per-expert, keeping the block's forward signature.

    Factors live at their saved names: `self.w1.lora_A[adapter].weight` is saved as
    `experts.w1.lora_A.weight` (peft_shared_moe/factors.py).
    """

    adapter_layer_names = EXPERT_FACTORS
    other_param_names = SharedMoeLoraLayer.other_param_names + ("backend",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SharedMoeLoraConfig) -> None:
        super().__init__()
        layout = describe_experts(base_layer)
        if layout is None:
            raise ValueError(f"{type(base_layer).__name__} is not a fused experts block")
        self._init_bookkeeping(base_layer)
        self.layout = layout
        self.sharding = experts_sharding(base_layer, layout.transposed, not layout.interleaved)
        if self.sharding is not None and not hasattr(getattr(base_layer, "config", None), "_experts_implementation"):
            raise ParallelLayoutError(
                f"{type(base_layer).__name__} is sharded but does not dispatch through transformers' experts "
                f"interface; the adapter runs inside the parallel engine's hook only through that interface"
            )
        self.backend: dict[str, str] = {}
        for proj in PROJECTIONS:
            setattr(self, proj, ProjectionLora())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def factor_dict(self, factor: str) -> nn.ModuleDict:
        """The per-adapter `ModuleDict` of one factor, e.g. "w1.lora_A" -> self.w1.lora_A."""
        proj, side = factor.split(".")
        return getattr(getattr(self, proj), side)

    def __getattr__(self, name: str):
        # PEFT reaches adapter state through getattr(layer, name) for each name in adapter_layer_names;
        # ours are the dotted factor names ("w1.lora_A"). Our own code calls `factor_dict` instead,
        # which torch.compile can trace (a dotted attribute name cannot be a graph source).
        if "." in name:
            return self.factor_dict(name)
        return super().__getattr__(name)

    @property
    def in_features(self) -> int:
        return self.layout.hidden

    @property
    def out_features(self) -> int:
        return self.layout.hidden

    def update_layer(self, adapter_name: str, config: SharedMoeLoraConfig) -> None:
        _check_adapter_name(adapter_name)
        base_param = local(self.get_base_layer().gate_up_proj)
        num_experts, hidden, inter = self.layout.num_experts, self.layout.hidden, self.layout.inter
        for factor in EXPERT_FACTORS:
            shape = factor_shape(factor, num_experts, hidden, inter, config.r, config.shared_outer)
            weight = torch.empty(shape, dtype=base_param.dtype, device=base_param.device)
            _init_factor(weight, factor.endswith("lora_A"), fan_in(factor, hidden, inter, config.r), config)
            if self.sharding is not None:
                weight = self.sharding.distribute(factor, weight)
            self.factor_dict(factor)[adapter_name] = ExpertFactor(weight)
        self._record_scaling(adapter_name, config)
        self.backend[adapter_name] = config.backend
        self.set_adapter(self.active_adapters)

    def factors(self, adapter_name: str) -> ExpertLoraFactors:
        """One adapter's factors as the math uses them: this rank's shards when the block is sharded,
        a replicated factor's gradient summed over the ranks (parallel.py)."""
        tensors = None
        if not torch.compiler.is_compiling():
            # eager: plain dict lookups, not nn.Module.__getattr__ twice per factor (per layer and token);
            # a weight that is not a registered parameter (a parametrization, ...) takes the attribute path
            try:
                tensors = {f: self._modules[proj]._modules[side]._modules[adapter_name]._parameters["weight"]
                           for f, (proj, side) in _FACTOR_PATHS}
            except KeyError:
                pass
        if tensors is None:
            tensors = {f: self.factor_dict(f)[adapter_name].weight for f in EXPERT_FACTORS}
        if self.sharding is not None:
            tensors = {f: self.sharding.local_for_compute(t) for f, t in tensors.items()}
        return ExpertLoraFactors(tensors, scaling=self.scaling[adapter_name])

    def combined_factors(self, adapter_names: list[str]) -> ExpertLoraFactors:
        """Several active adapters as one: factors concatenated along the rank, scalings folded into B.

        Exact, since sum_i s_i B_i A_i = [s_1 B_1, s_2 B_2, ...] @ [A_1; A_2; ...]. A shared factor
        is broadcast per expert only when it is combined with a per-expert one.
        """
        if len(adapter_names) == 1:
            return self.factors(adapter_names[0])
        parts = [self.factors(a) for a in adapter_names]
        dtype = parts[0].dtype

        def cat(factor: str) -> torch.Tensor:
            tensors = [p[factor] * (p.scaling if factor.endswith("lora_B") else 1.0) for p in parts]
            if len({t.shape[0] for t in tensors}) > 1:
                num_experts = max(t.shape[0] for t in tensors)  # this rank's experts under expert parallelism
                tensors = [t.expand(num_experts, *t.shape[1:]) for t in tensors]
            return torch.cat([t.to(dtype) for t in tensors], dim=1 if factor.endswith("lora_A") else 2)

        return ExpertLoraFactors({f: cat(f) for f in EXPERT_FACTORS}, scaling=1.0)

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self.get_base_layer()).__name__}: an experts block has two base weights (gate_up_proj and "
            f"down_proj), not the one W' - W that get_additive_delta returns; delta_by_base_param({adapter_name!r}) "
            f"gives both"
        )

    def delta_by_base_param(self, adapter_name: str) -> dict[str, torch.Tensor]:
        f = self.factors(adapter_name)
        # Shared (1, ., .) factors broadcast over experts in the batched product.
        gate = torch.matmul(f["w1.lora_B"], f["w1.lora_A"])  # (E, I, H)
        up = torch.matmul(f["w3.lora_B"], f["w3.lora_A"])  # (E, I, H)
        down = torch.matmul(f["w2.lora_B"], f["w2.lora_A"])  # (E, H, I)
        s = f.scaling
        return self.layout.storage_deltas(s * gate, s * up, s * down)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                adapter_names: Optional[list[str]] = None):
        base = self.get_base_layer()
        if adapter_names is not None:
            return self._mixed_batch_forward(base, hidden_states, top_k_index, top_k_weights, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(hidden_states, top_k_index, top_k_weights)
        active = self._active_here()
        if self.merged or not active:
            return base(hidden_states, top_k_index, top_k_weights)
        if self.sharding is not None and self.sharding.splits_compute:
            return self._forward_in_parallel_engine(base, hidden_states, top_k_index, top_k_weights, active)
        lora = self.combined_factors(active)
        return run_experts(base, self.layout, hidden_states, top_k_index, top_k_weights, lora, self.backend[active[0]])

    def _mixed_batch_forward(self, base: nn.Module, hidden_states, top_k_index, top_k_weights, adapter_names):
        """One adapter per sample (PEFT's `adapter_names`). On the Triton backend, one call of the mixed
        kernels serves every adapter (each token carries its adapter's slot). Otherwise, since the gate/up
        LoRA acts before the gate (an adapter's output is not the base's plus a delta), each adapter's
        tokens run the whole experts computation with that adapter, the "__base__" tokens the base block."""
        self._check_mixed_batch()
        num_tokens, num_samples = hidden_states.shape[0], len(adapter_names)
        if num_tokens % num_samples:
            raise ValueError(f"adapter_names has {num_samples} names (one per sample) but the experts block got "
                             f"{num_tokens} tokens, not a whole number per sample")
        present = list(dict.fromkeys(n for n in adapter_names if n in self.scaling))
        if present:
            slot_of = {name: i for i, name in enumerate(present)}
            per_sample = [slot_of.get(n, -1) for n in adapter_names]
            token_slot = torch.tensor(per_sample, dtype=torch.int32).repeat_interleave(num_tokens // num_samples)
            out = run_mixed_experts(base, self.layout, hidden_states, top_k_index, top_k_weights,
                                    [self.factors(n) for n in present], [self.backend[n] for n in present],
                                    token_slot.to(hidden_states.device, non_blocking=True))
            if out is not None:
                return out
        out = None
        for name, rows in self._rows_by_adapter(adapter_names, num_tokens // num_samples, hidden_states.device):
            args = (hidden_states[rows], top_k_index[rows], top_k_weights[rows])
            if name == BASE_NAME:
                part = base(*args)
            else:
                part = run_experts(base, self.layout, *args, self.factors(name), self.backend[name])
            if out is None:
                out = part.new_empty(num_tokens, *part.shape[1:])
            out[rows] = part
        return out

    def _forward_in_parallel_engine(self, base: nn.Module, hidden_states, top_k_index, top_k_weights, active):
        """Run through the base block's own parallel hook (transformers' TP / EP), which makes the inputs
        and weights local, exchanges tokens and sums the partial outputs; inside it, the block's experts
        interface is pointed at ours for this call, which adds the adapter's local shards."""
        call = AdapterCall(lambda: self.combined_factors(active), self.backend[active[0]], self.sharding.expert_parallel)
        with call.installed_on(base):
            return base(hidden_states, top_k_index, top_k_weights)

    def __repr__(self) -> str:
        return "shared_moe_lora." + super().__repr__()


class LinearLoraLayer(nn.Module, SharedMoeLoraLayer):
    """Ordinary LoRA on an `nn.Linear` (the attention projections): y = W x + s B A dropout(x)."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = SharedMoeLoraLayer.other_param_names + ("lora_dropout",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: SharedMoeLoraConfig) -> None:
        super().__init__()
        self._init_bookkeeping(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.sharding = linear_sharding(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: SharedMoeLoraConfig) -> None:
        _check_adapter_name(adapter_name)
        base = self.get_base_layer()
        weight = local(base.weight)
        dtype, device = weight.dtype, weight.device
        lora_A = nn.Linear(base.in_features, config.r, bias=False, device=device, dtype=dtype)
        lora_B = nn.Linear(config.r, base.out_features, bias=False, device=device, dtype=dtype)
        _init_factor(lora_A.weight, True, base.in_features, config)
        _init_factor(lora_B.weight, False, config.r, config)
        if self.sharding is not None:
            for factor, module in (("lora_A", lora_A), ("lora_B", lora_B)):
                module.weight = nn.Parameter(self.sharding.distribute(factor, module.weight.detach()))
        self.lora_A[adapter_name] = lora_A
        self.lora_B[adapter_name] = lora_B
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self._record_scaling(adapter_name, config)
        self.set_adapter(self.active_adapters)

    def delta_by_base_param(self, adapter_name: str) -> dict[str, torch.Tensor]:
        A, B = (self._local_factor(m[adapter_name].weight) for m in (self.lora_A, self.lora_B))
        return {"weight": self.scaling[adapter_name] * (B @ A)}  # this rank's shard of the weight, if split

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        # PEFT >= 0.22's W' - W (for convert_to_lora), in the adapter's dtype
        return self.delta_by_base_param(adapter_name)["weight"]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            return self._mixed_batch_forward(base, x, adapter_names, *args, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        result = base(x, *args, **kwargs)
        if self.merged:
            return result
        in_place = not torch.is_grad_enabled() and _fresh_output(base, result, x)
        for name in self._active_here():
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            dropout = self.lora_dropout[name]
            if self.sharding is not None:
                delta = self._sharded_delta(x, local(A), local(B), dropout, result)
            else:
                x_in = x.to(A.dtype) if isinstance(dropout, nn.Identity) else dropout(x.to(A.dtype))
                delta = F.linear(F.linear(x_in, A), B)  # plain functions: this runs per token in generate
                if in_place:
                    # inference: scale, cast and add as one in-place op on the base's fresh output (two
                    # launches fewer per layer and token in eager generate; one rounding instead of two)
                    result = result.add_(delta, alpha=self.scaling[name])
                    continue
            result = result + (self.scaling[name] * delta).to(result.dtype)
        return result

    def _mixed_batch_forward(self, base: nn.Module, x: torch.Tensor, adapter_names: list[str], *args, **kwargs):
        """One adapter per sample (PEFT's `adapter_names`): the base once, each adapter's delta on its rows."""
        self._check_mixed_batch()
        if x.shape[0] % len(adapter_names):  # (batch, ...) inputs, or tokens flattened sample-major (shared experts)
            raise ValueError(f"adapter_names has {len(adapter_names)} names but this layer got {x.shape[0]} rows, "
                             f"not a whole number per sample: one name per sample")
        result = base(x, *args, **kwargs)
        present = list(dict.fromkeys(n for n in adapter_names if n in self.scaling))
        dropout_off = not self.training or all(isinstance(self.lora_dropout[n], nn.Identity) for n in present)
        if present and dropout_off:  # every adapter's delta in one launch where the kernel is exact
            slot_of = {name: i for i, name in enumerate(present)}
            per_sample = torch.tensor([slot_of.get(n, -1) for n in adapter_names], dtype=torch.int32)
            row_slot = per_sample.repeat_interleave(result.numel() // result.shape[-1] // len(adapter_names))
            mixed = mixed_linear_lora(result, x, [(self.lora_A[n].weight, self.lora_B[n].weight) for n in present],
                                      [self.scaling[n] for n in present], row_slot.to(x.device, non_blocking=True))
            if mixed is not None:
                return mixed
        for name, rows in self._rows_by_adapter(adapter_names, x.shape[0] // len(adapter_names), x.device):
            if name == BASE_NAME:
                continue
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            delta = F.linear(F.linear(self.lora_dropout[name](x[rows].to(A.dtype)), A), B)
            result = result.index_add(0, rows, (self.scaling[name] * delta).to(result.dtype))
        return result

    def _sharded_delta(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dropout: nn.Module,
                       result: torch.Tensor) -> torch.Tensor:
        """B A x on this rank, for a base split colwise (output shard) or rowwise (input shard), or left
        whole in a parallel model ("replicated"), docs/PARALLEL.md.

        colwise: x is whole and A replicated, so x A^T is whole on every rank but its gradient is partial
        (each rank sees its B rows): summed once, which gives A and x their full gradients.
        rowwise: x and A are split along the input, so x A^T is partial: summed once in the forward.
        """
        x = local(x).to(A.dtype)
        if is_dtensor(result) or x.shape[-1] != A.shape[-1] or result.shape[-1] != B.shape[0]:
            raise ParallelLayoutError(
                f"{type(self.get_base_layer()).__name__} is split {self.sharding.style} but its forward took "
                f"{tuple(x.shape)} and gave {type(result).__name__} {tuple(result.shape)}; the adapter follows the "
                f"'colwise' and 'rowwise' plans (local output / local input) only"
            )
        if not isinstance(dropout, nn.Identity):
            x = dropout(x)
        if self.sharding.style == "colwise":
            return F.linear(SumGradOver.apply(F.linear(x, A), self.sharding.group), B)
        if self.sharding.style == "rowwise":
            return F.linear(SumOver.apply(F.linear(x, A), self.sharding.group), B)
        return F.linear(F.linear(x, A), B)  # "replicated": a whole linear, the same batch on every rank

    def __repr__(self) -> str:
        return "shared_moe_lora." + super().__repr__()
