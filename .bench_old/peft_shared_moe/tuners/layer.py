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
from ..ops import ExpertLoraFactors, resolve_backend

# Model attribute of each expert factor -> its key in the saved (serving) layout, REFERENCE §3.
# w1 = gate_proj, w3 = up_proj, w2 = down_proj.
EXPERT_FACTOR_KEYS = {
    "lora_gate_A": "w1.lora_A",
    "lora_gate_B": "w1.lora_B",
    "lora_up_A": "w3.lora_A",
    "lora_up_B": "w3.lora_B",
    "lora_down_A": "w2.lora_A",
    "lora_down_B": "w2.lora_B",
}


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers fused experts block: gate_up_proj (E, 2I, H), down_proj (E, H, I), act_fn.

    Recognised by structure so every model with this layout (Qwen3-MoE, Qwen2-MoE, OLMoE,
    Mixtral, ...) works; transposed, biased or interleaved variants (GPT-OSS) are refused.
    """
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not callable(getattr(module, "act_fn", None)):
        return False
    num_experts, two_i, hidden = gate_up.shape
    layout_ok = not getattr(module, "is_transposed", False) and not getattr(module, "has_bias", False)
    layout_ok = layout_ok and getattr(module, "is_concatenated", True)
    return layout_ok and two_i % 2 == 0 and tuple(down.shape) == (num_experts, hidden, two_i // 2)


def expert_factor_shapes(
    num_experts: int, hidden: int, inter: int, r: int, shared_outer: bool
) -> dict[str, tuple[int, int, int]]:
    """Factor attribute -> shape (REFERENCE §3); dim 0 is 1 for the shared factors."""
    outer = 1 if shared_outer else num_experts
    return {
        "lora_gate_A": (outer, r, hidden),
        "lora_gate_B": (num_experts, inter, r),
        "lora_up_A": (outer, r, hidden),
        "lora_up_B": (num_experts, inter, r),
        "lora_down_A": (num_experts, r, inter),
        "lora_down_B": (outer, hidden, r),
    }


def _uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    # Kaiming-uniform with a = sqrt(5), as PEFT's LoRA initialises A: bound 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # Half-precision bases get float32 factors (what PEFT's autocast_adapter_dtype does anyway).
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class SharedMoeLoraLayer(BaseTunerLayer):
    """What both adapter layers share: scaling bookkeeping and merge / unmerge through deltas."""

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

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            deltas = self.delta_by_base_param(name)
            merged = {p: getattr(base, p).data + deltas[p].to(getattr(base, p).dtype) for p in deltas}
            if safe_merge:
                broken = [p for p, t in merged.items() if not torch.isfinite(t).all()]
                if broken:
                    raise ValueError(f"merging adapter {name!r} would make {broken} non-finite; nothing was merged")
            for p, value in merged.items():
                getattr(base, p).data.copy_(value)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            for p, delta in self.delta_by_base_param(name).items():
                param = getattr(base, p)
                param.data -= delta.to(param.dtype)

    def _active_here(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.scaling]


class ExpertsLoraLayer(nn.Module, SharedMoeLoraLayer):
    """LoRA on a fused experts block, shared-outer or per-expert, keeping the block's forward signature."""

    adapter_layer_names = tuple(EXPERT_FACTOR_KEYS)
    other_param_names = SharedMoeLoraLayer.other_param_names + ("backend",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SharedMoeLoraConfig) -> None:
        super().__init__()
        self._init_bookkeeping(base_layer)
        self.backend: dict[str, str] = {}
        for attr in EXPERT_FACTOR_KEYS:
            setattr(self, attr, nn.ParameterDict())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @property
    def dims(self) -> tuple[int, int, int]:
        """(E, H, I) of the wrapped experts block."""
        num_experts, two_i, hidden = self.get_base_layer().gate_up_proj.shape
        return num_experts, hidden, two_i // 2

    def update_layer(self, adapter_name: str, config: SharedMoeLoraConfig) -> None:
        if config.r <= 0:
            raise ValueError(f"r must be a positive integer, got {config.r}")
        base_param = self.get_base_layer().gate_up_proj
        dtype, device = _adapter_dtype(base_param.dtype), base_param.device
        _, hidden, inter = self.dims
        fan_in = {"lora_gate_A": hidden, "lora_up_A": hidden, "lora_down_A": inter}
        for attr, shape in expert_factor_shapes(*self.dims, config.r, config.shared_outer).items():
            factor = torch.empty(shape, dtype=dtype, device=device)
            if attr in fan_in:
                _uniform_(factor, fan_in[attr])
            elif config.init_lora_weights:
                nn.init.zeros_(factor)
            else:
                _uniform_(factor, config.r)
            getattr(self, attr)[adapter_name] = nn.Parameter(factor)
        self._record_scaling(adapter_name, config)
        self.backend[adapter_name] = config.backend
        self.set_adapter(self.active_adapters)

    def factors(self, adapter_name: str) -> ExpertLoraFactors:
        return ExpertLoraFactors(
            gate_A=self.lora_gate_A[adapter_name],
            gate_B=self.lora_gate_B[adapter_name],
            up_A=self.lora_up_A[adapter_name],
            up_B=self.lora_up_B[adapter_name],
            down_A=self.lora_down_A[adapter_name],
            down_B=self.lora_down_B[adapter_name],
            scaling=self.scaling[adapter_name],
        )

    def combined_factors(self, adapter_names: list[str]) -> ExpertLoraFactors:
        """Several active adapters as one: factors concatenated along the rank, scalings folded into B.

        Exact, since sum_i s_i B_i A_i = [s_1 B_1, s_2 B_2, ...] @ [A_1; A_2; ...]. A shared factor
        is broadcast per expert only when it is combined with a per-expert one.
        """
        if len(adapter_names) == 1:
            return self.factors(adapter_names[0])
        parts = [self.factors(a) for a in adapter_names]
        num_experts = self.dims[0]

        def cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
            if len({t.shape[0] for t in tensors}) > 1:
                tensors = [t.expand(num_experts, *t.shape[1:]) for t in tensors]
            return torch.cat([t.to(parts[0].dtype) for t in tensors], dim=dim)

        return ExpertLoraFactors(
            gate_A=cat([p.gate_A for p in parts], 1),
            gate_B=cat([p.scaling * p.gate_B for p in parts], 2),
            up_A=cat([p.up_A for p in parts], 1),
            up_B=cat([p.scaling * p.up_B for p in parts], 2),
            down_A=cat([p.down_A for p in parts], 1),
            down_B=cat([p.scaling * p.down_B for p in parts], 2),
            scaling=1.0,
        )

    def delta_by_base_param(self, adapter_name: str) -> dict[str, torch.Tensor]:
        f = self.factors(adapter_name)
        # Shared (1, ., .) factors broadcast over experts in the batched product.
        gate = torch.matmul(f.gate_B, f.gate_A)  # (E, I, H)
        up = torch.matmul(f.up_B, f.up_A)  # (E, I, H)
        down = torch.matmul(f.down_B, f.down_A)  # (E, H, I)
        return {"gate_up_proj": f.scaling * torch.cat([gate, up], dim=1), "down_proj": f.scaling * down}

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(hidden_states, top_k_index, top_k_weights)
        active = self._active_here()
        if self.merged or not active:
            return base(hidden_states, top_k_index, top_k_weights)
        lora = self.combined_factors(active)
        weights = (base.gate_up_proj, base.down_proj)
        backend = resolve_backend(self.backend[active[0]], hidden_states, base.act_fn, lora, weights)
        return backend(hidden_states, top_k_index, top_k_weights, *weights, base.act_fn, lora=lora)

    def __repr__(self) -> str:
        return "shared_moe_lora." + super().__repr__()


class LinearLoraLayer(nn.Module, SharedMoeLoraLayer):
    """Ordinary LoRA on an `nn.Linear` (the attention projections): y = W x + s B A dropout(x)."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = SharedMoeLoraLayer.other_param_names + ("lora_dropout",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: SharedMoeLoraConfig) -> None:
        super().__init__()
        self._init_bookkeeping(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: SharedMoeLoraConfig) -> None:
        if config.r <= 0:
            raise ValueError(f"r must be a positive integer, got {config.r}")
        base = self.get_base_layer()
        dtype, device = _adapter_dtype(base.weight.dtype), base.weight.device
        lora_A = nn.Linear(base.in_features, config.r, bias=False, device=device, dtype=dtype)
        lora_B = nn.Linear(config.r, base.out_features, bias=False, device=device, dtype=dtype)
        _uniform_(lora_A.weight, base.in_features)
        if config.init_lora_weights:
            nn.init.zeros_(lora_B.weight)
        else:
            _uniform_(lora_B.weight, config.r)
        self.lora_A[adapter_name] = lora_A
        self.lora_B[adapter_name] = lora_B
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self._record_scaling(adapter_name, config)
        self.set_adapter(self.active_adapters)

    def delta_by_base_param(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"weight": self.scaling[adapter_name] * (self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight)}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        result = base(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self._active_here():
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            dropout = self.lora_dropout[name]
            x_in = x.to(A.dtype) if isinstance(dropout, nn.Identity) else dropout(x.to(A.dtype))
            delta = F.linear(F.linear(x_in, A), B)  # plain functions: this runs per token in generate
            result = result + (self.scaling[name] * delta).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "shared_moe_lora." + super().__repr__()
