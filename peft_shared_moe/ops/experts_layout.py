"""The contract of a transformers fused experts block: how it stores its weights and how it gates.

transformers' `@use_experts_implementation` marks each experts class with flags (`is_transposed`,
`has_bias`, `is_concatenated`, `has_gate`) and may give it its own `_apply_gate`; every experts
implementation must honour them (docs/LAYOUTS.md lists each architecture). `describe_experts` reads
them once into an `ExpertsLayout`; the compute paths and the merge work in one canonical layout
(gate, up: (E, I, H); down: (E, H, I)) and the layout maps to and from the module's storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


class UnsupportedExpertsError(ValueError):
    """An experts block we recognise but cannot adapt exactly; the message names the class and the reason."""


@dataclass(frozen=True)
class ExpertsLayout:
    """How one experts block stores its weights, in the terms of transformers' experts flags."""

    num_experts: int
    hidden: int
    inter: int
    transposed: bool = False  # weights stored (E, in, out) instead of (E, out, in)
    interleaved: bool = False  # gate/up rows alternate (g0, u0, g1, u1, ...) instead of [gate; up]
    has_bias: bool = False  # gate_up_proj_bias (E, 2I), down_proj_bias (E, H)
    silu_gate: bool = True  # the block's gate is SiLU(gate) * up (what the fused kernels implement)

    @property
    def fused_kernels_ok(self) -> bool:
        """The Triton kernels implement exactly this layout: [gate; up] (E, 2I, H), no bias, SiLU gate."""
        return not (self.transposed or self.interleaved or self.has_bias) and self.silu_gate

    def storage_deltas(
        self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Canonical weight deltas gate/up (E, I, H), down (E, H, I) -> deltas of the module's parameters."""
        if self.interleaved:
            gate_up = torch.stack([gate, up], dim=2).flatten(1, 2)  # (E, 2I, H), rows g0, u0, g1, u1, ...
        else:
            gate_up = torch.cat([gate, up], dim=1)  # (E, 2I, H)
        if self.transposed:
            return {"gate_up_proj": gate_up.transpose(1, 2), "down_proj": down.transpose(1, 2)}
        return {"gate_up_proj": gate_up, "down_proj": down}


def _is_silu(act_fn: object) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act_fn, (nn.SiLU, SiLUActivation)) or act_fn is torch.nn.functional.silu


def _has_default_gate(module: nn.Module) -> bool:
    gate = getattr(type(module), "_apply_gate", None)
    if gate is None:
        return True
    from transformers.integrations import moe

    return gate is getattr(moe, "_default_apply_gate", None)


def describe_experts(module: nn.Module) -> Optional[ExpertsLayout]:
    """The layout of a fused experts block, None for any other module.

    Raises `UnsupportedExpertsError` for a block with 3D expert weights that this library cannot
    adapt exactly, so `get_peft_model` refuses it instead of computing something else.
    """
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return None
    if gate_up.dim() != 3 or down.dim() != 3:
        return None
    name = type(module).__name__
    unsupported = [
        flag for flag in ("is_transposed", "has_bias") if getattr(module, flag, False)
    ] + (["interleaved gate/up (is_concatenated=False)"] if not getattr(module, "is_concatenated", True) else [])
    if unsupported:
        raise UnsupportedExpertsError(f"{name}: experts stored with {unsupported} are not supported yet")
    if not _has_default_gate(module):
        raise UnsupportedExpertsError(f"{name}: its own _apply_gate is not supported yet")
    if not callable(getattr(module, "act_fn", None)):
        raise UnsupportedExpertsError(f"{name}: no act_fn, so its gate function is unknown")
    num_experts, two_i, hidden = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (num_experts, hidden, two_i // 2):
        raise UnsupportedExpertsError(
            f"{name}: gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} do not form "
            f"(E, 2I, H) and (E, H, I)"
        )
    return ExpertsLayout(num_experts, hidden, two_i // 2, silu_gate=_is_silu(module.act_fn))
