"""The contract of a transformers fused experts block: how it stores its weights and how it gates.

transformers' `@use_experts_implementation` marks each experts class with flags (`is_transposed`,
`has_bias`, `is_concatenated`, `has_gate`, `has_post_expert_norm`) and may give it its own
`_apply_gate`; every experts implementation must honour them (docs/LAYOUTS.md lists each
architecture). `describe_experts` reads them once into an `ExpertsLayout`. The LoRA factors are
always in the serving engines' canonical shapes (factors.py); the layout says where a canonical
gate / up / down delta lands in the module's own storage, for the forward and for the merge.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

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
    has_bias: bool = False  # gate_up_proj_bias (E, 2I), down_proj_bias (E, H), added by the block
    silu_gate: bool = True  # the block gates with transformers' default act_fn(gate) * up, act_fn = SiLU
    own_gate: bool = False  # the class defines its own `_apply_gate` (clamps, other activations)
    # Expert parallel: a route to another rank's expert arrives as index `num_experts` (weight 0) and is skipped.
    skips_foreign_experts: bool = False

    @property
    def fused_kernels_ok(self) -> bool:
        """The Triton kernels implement exactly this layout: [gate; up] (E, 2I, H), no bias, SiLU gate."""
        return (
            not (self.transposed or self.interleaved or self.has_bias or self.own_gate or self.skips_foreign_experts)
            and self.silu_gate
        )

    def gate_up_columns(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Gate and up values (..., I) each -> (..., 2I) in the block's gate_up column order.

        Used both for activations (S, I) in the forward and, through `storage_deltas`, for weight rows.
        """
        if self.interleaved:
            return torch.stack([gate, up], dim=-1).flatten(-2)  # g0, u0, g1, u1, ...
        return torch.cat([gate, up], dim=-1)

    def storage_deltas(
        self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Canonical weight deltas gate/up (E, I, H), down (E, H, I) -> deltas of the module's parameters.

        Biases are not LoRA targets and get no delta.
        """
        # Rows of the (E, 2I, H) view are the gate_up output columns: order them as the block does.
        gate_up = self.gate_up_columns(gate.transpose(1, 2), up.transpose(1, 2)).transpose(1, 2)  # (E, 2I, H)
        if self.transposed:
            return {"gate_up_proj": gate_up.transpose(1, 2), "down_proj": down.transpose(1, 2)}
        return {"gate_up_proj": gate_up, "down_proj": down}


def _is_silu(act_fn: object) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act_fn, (nn.SiLU, SiLUActivation)) or act_fn is torch.nn.functional.silu


def _default_gate_fn() -> Optional[Callable]:
    from transformers.integrations import moe

    return getattr(moe, "_default_apply_gate", None)


def _has_own_gate(module: nn.Module) -> bool:
    gate = getattr(type(module), "_apply_gate", None)
    return gate is not None and gate is not _default_gate_fn()


def default_gate(act_fn: Callable[[torch.Tensor], torch.Tensor], is_silu: Optional[bool] = None
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' default gate on [gate; up] columns: act_fn(gate) * up.

    A SiLU is computed with torch's own: transformers >= 5.25 may swap the act_fn module's forward for a
    hub kernel (`use_kernels`), whose autograd and dtypes are not ours to rely on; the value is the same.
    `is_silu`: already known (`ExpertsLayout.silu_gate`), or None to look.
    """
    activation = torch.nn.functional.silu if (_is_silu(act_fn) if is_silu is None else is_silu) else act_fn

    def gate(gate_up: torch.Tensor) -> torch.Tensor:
        g, u = gate_up.chunk(2, dim=-1)
        return activation(g) * u

    return gate


def gate_function(module: nn.Module, layout: "ExpertsLayout") -> Callable[[torch.Tensor], torch.Tensor]:
    """The block's own gate on a (S, 2I) gate_up tensor in its column order -> (S, I).

    The class's own `_apply_gate` when it overrides transformers' default (`layout.own_gate`), so clamps
    and custom activations are the module's code, never re-derived here; otherwise the default
    act_fn(gate) * up on [gate; up] (`default_gate`). Read from the layout, found once per block, so a
    call costs no lookups.
    """
    if layout.own_gate:
        return module._apply_gate
    return default_gate(module.act_fn, layout.silu_gate)


def _is_3d(t: object) -> bool:
    from .quantized import QuantizedExpertWeights  # a quantized base keeps the weight's (E, out, in) shape

    return isinstance(t, (torch.Tensor, QuantizedExpertWeights)) and t.dim() == 3


def _takes_routing(module: nn.Module) -> bool:
    """forward(hidden_states, top_k_index, top_k_weights): the experts interface's call."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]  # drop self
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _shape_reading(gate_up: torch.Tensor, down: torch.Tensor, transposed: bool) -> Optional[tuple[int, int, int]]:
    """(E, H, I) when gate_up/down have the shapes of that storage, else None."""
    if transposed:
        num_experts, hidden, two_i = gate_up.shape
        want_down = (num_experts, two_i // 2, hidden)
    else:
        num_experts, two_i, hidden = gate_up.shape
        want_down = (num_experts, hidden, two_i // 2)
    if two_i % 2 or two_i == 0 or tuple(down.shape) != want_down:
        return None
    return num_experts, hidden, two_i // 2


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor_subclass(t: object) -> Optional[str]:
    """The class name of a tensor subclass that wraps other storage (torchao's quantized tensors, ...),
    None for plain tensors, parameters and DTensor shards: such a subclass may report a float dtype
    while its values live elsewhere, so reading it as a dense weight is not known to be exact."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not isinstance(t, torch.Tensor) or not is_traceable_wrapper_subclass(t):
        return None
    return None if type(t).__name__ == "DTensor" else type(t).__name__


def _refuse_foreign_quantization(module: nn.Module, name: str, gate_up, down) -> None:
    """Expert weights quantized by another scheme (transformers' FineGrainedFP8, an int / FP4 packing, a
    torchao tensor subclass): their values mean nothing without that scheme's scales and kernels, so
    computing with them would be silently wrong. Only this library's own `QuantizedExpertWeights`
    (quantize_experts, which also adopts FineGrainedFP8 experts) are read."""
    from .quantized import QuantizedExpertWeights

    scale_names = ("scale_inv", "_scale", "_scales", "absmax")
    scales = sorted(n for n, _ in module.named_parameters(recurse=False) if n.endswith(scale_names))
    scales += sorted(n for n, _ in module.named_buffers(recurse=False) if n.endswith(scale_names))
    pairs = (("gate_up_proj", gate_up), ("down_proj", down))
    foreign = [f"{p} {t.dtype}" for p, t in pairs if isinstance(t, torch.Tensor) and t.dtype not in _FLOAT_DTYPES]
    foreign += [f"{p} is a {_tensor_subclass(t)}" for p, t in pairs if _tensor_subclass(t)]
    if foreign or (scales and not isinstance(gate_up, QuantizedExpertWeights)):
        fine_grained = any("scale_inv" in s for s in scales)
        scheme = "FineGrainedFP8" if fine_grained else "an unknown quantization"
        remedy = ("peft_shared_moe.quantize_experts(model, 'fp8') adopts its FP8 weights and scales as they are"
                  if fine_grained else
                  "load the bf16 model and quantize it with peft_shared_moe.quantize_experts(model, 'nf4' or 'fp8')")
        raise UnsupportedExpertsError(
            f"{name}: expert weights quantized by {scheme} ({', '.join(foreign) or 'float'}"
            f"{', scales ' + ', '.join(scales) if scales else ''}) are not supported as they are: {remedy}"
        )


def describe_experts(module: nn.Module) -> Optional[ExpertsLayout]:
    """The layout of a fused experts block, None for any other module.

    Flags come from transformers' decorator (`@use_experts_implementation`, present with the same
    names in 5.17 and 5.24; `has_post_expert_norm` is newer and absent means False, which is the
    behaviour of every class that lacks it). A block without the flags (an undecorated class such as
    Llama4TextExperts or Step3p7Experts) is read from its shapes and accepted only where that
    reading is unambiguous and its forward takes the experts interface's (hidden, top_k_index,
    top_k_weights). Raises `UnsupportedExpertsError` for a block with 3D expert weights that this
    library cannot adapt exactly, so `get_peft_model` refuses it instead of computing something else.
    """
    name = type(module).__name__
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    flagged = hasattr(module, "is_transposed") and hasattr(module, "has_gate")

    if flagged and not module.has_gate:
        if _is_3d(down) and _is_3d(getattr(module, "up_proj", None)):
            raise UnsupportedExpertsError(
                f"{name}: has_gate=False (experts with up_proj and down_proj only, act_fn(up) with no gate); "
                f"the serving layout needs a gate projection w1, so there is no w1/w3/w2 adapter for it"
            )
        return None
    if not (_is_3d(gate_up) and _is_3d(down)):
        return None
    _refuse_foreign_quantization(module, name, gate_up, down)

    if getattr(module, "has_post_expert_norm", False):
        raise UnsupportedExpertsError(
            f"{name}: has_post_expert_norm=True (a norm on each expert's output before the routing-weighted "
            f"sum) is not supported: the down-projection LoRA would have to pass through that norm"
        )
    if not _takes_routing(module):
        raise UnsupportedExpertsError(
            f"{name}: its forward does not take (hidden_states, top_k_index, top_k_weights) (for example, "
            f"Llama4TextExperts runs every expert on router-scaled copies of the input), so a LoRA experts "
            f"layer with that contract cannot stand in for it"
        )

    biases = [getattr(module, p, None) for p in ("gate_up_proj_bias", "down_proj_bias")]
    if flagged:
        transposed = bool(module.is_transposed)
        interleaved = not getattr(module, "is_concatenated", True)
        has_bias = bool(getattr(module, "has_bias", False))
        reading = _shape_reading(gate_up, down, transposed)
        if reading is None:
            raise UnsupportedExpertsError(
                f"{name}: gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} do not have the "
                f"shapes its flag is_transposed={transposed} says ("
                + ("(E, H, 2I) and (E, I, H)" if transposed else "(E, 2I, H) and (E, H, I)")
                + "; e.g. extra zero/identity experts)"
            )
    else:
        # No flags: read the storage from the shapes. Both readings fitting at once is impossible for
        # 3D gate_up and down (it would need H = 2I and I = H), but refuse rather than guess.
        readings = {t: _shape_reading(gate_up, down, t) for t in (False, True)}
        fits = [t for t, r in readings.items() if r is not None]
        if len(fits) != 1:
            raise UnsupportedExpertsError(
                f"{name}: has no experts flags, and gate_up_proj {list(gate_up.shape)} with down_proj "
                f"{list(down.shape)} "
                + ("fit both (E, 2I, H) and (E, H, 2I) storage" if fits else "fit neither (E, 2I, H)/(E, H, I) "
                   "nor (E, H, 2I)/(E, I, H)")
            )
        transposed, interleaved, has_bias = fits[0], False, False  # [gate; up]: transformers' default
        reading = readings[transposed]
        if any(isinstance(b, torch.Tensor) for b in biases):
            raise UnsupportedExpertsError(
                f"{name}: has expert biases but no has_bias flag, so whether its forward adds them is unknown"
            )
    num_experts, hidden, inter = reading

    if has_bias:
        want = [(num_experts, 2 * inter), (num_experts, hidden)]
        got = [tuple(b.shape) if isinstance(b, torch.Tensor) else None for b in biases]
        if got != want:
            raise UnsupportedExpertsError(
                f"{name}: has_bias=True but gate_up_proj_bias/down_proj_bias are {got}, expected {want}"
            )

    own_gate = _has_own_gate(module)
    act_fn = getattr(module, "act_fn", None)
    if not own_gate:
        if not callable(act_fn):
            raise UnsupportedExpertsError(f"{name}: no act_fn and no _apply_gate, so its gate function is unknown")
        if interleaved:
            raise UnsupportedExpertsError(
                f"{name}: is_concatenated=False (interleaved gate/up) with the default gate, which splits "
                f"[gate; up]: the two disagree on which columns are the gate"
            )
    return ExpertsLayout(
        num_experts,
        hidden,
        inter,
        transposed=transposed,
        interleaved=interleaved,
        has_bias=has_bias,
        silu_gate=not own_gate and _is_silu(act_fn),
        own_gate=own_gate,
    )
