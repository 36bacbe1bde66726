"""The math of the library: experts compute backends behind one switch, chosen by name.

`EXPERTS_BACKENDS` maps a name to a function with the contract of `torch_experts.experts_forward`
(minus `linear`): "torch" (grouped GEMMs, autograd), "loop" (exact per-expert loop), and "triton"
(fused inference kernels) where triton imports. `resolve_backend("auto", ...)` picks per call.

Two call contracts (`run_experts` makes the call):
- every backend: `fn(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn, lora=lora)`
  for the layouts the fused kernels implement (`ExpertsLayout.fused_kernels_ok`);
- backends marked `honours_layout` (the torch ones) also get `layout=`, `apply_gate=` (the block's
  own gate), `gate_up_bias=`, `down_bias=`, and run every layout `describe_experts` accepts.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import nn

from .experts_layout import ExpertsLayout, UnsupportedExpertsError, describe_experts, gate_function
from .routing import ExpertRouting, sort_pairs_by_expert
from .torch_experts import ExpertLoraFactors, experts_forward, grouped_mm_linear, loop_grouped_linear

ExpertsBackend = Callable[..., torch.Tensor]

EXPERTS_BACKENDS: dict[str, ExpertsBackend] = {
    "torch": partial(experts_forward, linear=grouped_mm_linear),
    "loop": partial(experts_forward, linear=loop_grouped_linear),
}
for _fn in EXPERTS_BACKENDS.values():
    _fn.honours_layout = True  # type: ignore[attr-defined]

try:
    from .triton_experts import triton_experts_forward

    EXPERTS_BACKENDS["triton"] = triton_experts_forward
except ImportError:  # triton is optional at run time; the torch paths cover every case
    pass


def resolve_backend(
    name: str,
    hidden_states: torch.Tensor,
    layout: ExpertsLayout,
    lora: Optional[ExpertLoraFactors] = None,
    weights: tuple[torch.Tensor, ...] = (),
) -> ExpertsBackend:
    """The backend function for a config's `backend` on this call; `weights` are (gate_up_proj, down_proj).

    "triton" raises `TritonBackendError` wherever the kernels would not compute the exact result
    (autograd needed, a layout or gate they do not implement, no CUDA device, triton missing, ...):
    computing something else silently is never an option. "auto" runs the kernels for CUDA
    inference where none of these holds, and the exact torch path otherwise.
    """
    from .triton_support import TritonBackendError

    if name == "triton" and name not in EXPERTS_BACKENDS:
        try:
            import triton  # noqa: F401  (only to say why the backend is missing)

            why = "the triton backend did not register"
        except ImportError as err:
            why = f"triton does not import ({err})"
        raise TritonBackendError.from_reasons([f"{why}: install triton, or use backend='auto' or 'torch'"])
    if name in ("auto", "triton") and "triton" in EXPERTS_BACKENDS:
        from . import triton_experts

        reasons = triton_experts.triton_refusals(hidden_states, weights, lora, layout=layout)
        if name == "triton":
            if reasons:
                raise TritonBackendError.from_reasons(reasons)
        elif not reasons and hidden_states.device.type in triton_experts.AUTO_DEVICE_TYPES:
            return partial(
                triton_experts.triton_unless_routing_grad, EXPERTS_BACKENDS["triton"], EXPERTS_BACKENDS["torch"]
            )
    if name == "auto":
        name = "torch"
    try:
        return EXPERTS_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown experts backend {name!r}; available: {sorted(EXPERTS_BACKENDS)} or 'auto'") from None


def run_experts(
    experts: nn.Module,
    layout: ExpertsLayout,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    lora: Optional[ExpertLoraFactors] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One experts block's forward (base experts plus an optional adapter) on the chosen backend.

    Layout-aware backends get the block's storage flags, its own gate function and its biases; any
    other backend (the Triton kernels) is called only for the layout it implements, and asking for
    it on another layout is an error rather than a different computation.
    """
    weights = (experts.gate_up_proj, experts.down_proj)
    biases = (experts.gate_up_proj_bias, experts.down_proj_bias) if layout.has_bias else (None, None)
    fn = resolve_backend(backend, hidden_states, layout, lora, weights)
    act_fn = getattr(experts, "act_fn", None)
    if getattr(fn, "honours_layout", False):
        return fn(
            hidden_states, top_k_index, top_k_weights, *weights, act_fn, lora=lora,
            layout=layout, apply_gate=gate_function(experts), gate_up_bias=biases[0], down_bias=biases[1],
        )
    return fn(hidden_states, top_k_index, top_k_weights, *weights, act_fn, lora=lora)


def transformers_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """A base-only experts implementation for transformers' `ExpertsInterface`."""
    return run_experts(self, describe_experts(self), hidden_states, top_k_index, top_k_weights)


def register_transformers_experts_implementation(name: str = "peft_shared_moe") -> None:
    """Make `from_pretrained(..., experts_implementation="peft_shared_moe")` run our kernels."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, transformers_experts_forward)


__all__ = [
    "EXPERTS_BACKENDS",
    "ExpertLoraFactors",
    "ExpertsLayout",
    "UnsupportedExpertsError",
    "describe_experts",
    "ExpertRouting",
    "experts_forward",
    "register_transformers_experts_implementation",
    "resolve_backend",
    "run_experts",
    "sort_pairs_by_expert",
]
