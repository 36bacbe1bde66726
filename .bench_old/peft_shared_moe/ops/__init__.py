"""The math of the library: experts compute backends behind one switch, chosen by name.

`EXPERTS_BACKENDS` maps a name to a function with the contract of `torch_experts.experts_forward`
(minus `linear`): "torch" (grouped GEMMs, autograd), "loop" (exact per-expert loop), and "triton"
(fused inference kernels) where triton imports. `resolve_backend("auto", ...)` picks per call.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import nn

from .routing import ExpertRouting, sort_pairs_by_expert
from .torch_experts import ExpertLoraFactors, experts_forward, grouped_mm_linear, loop_grouped_linear

ExpertsBackend = Callable[..., torch.Tensor]

EXPERTS_BACKENDS: dict[str, ExpertsBackend] = {
    "torch": partial(experts_forward, linear=grouped_mm_linear),
    "loop": partial(experts_forward, linear=loop_grouped_linear),
}

try:
    from .triton_experts import triton_experts_forward

    EXPERTS_BACKENDS["triton"] = triton_experts_forward
except ImportError:  # triton is optional at run time; the torch paths cover every case
    pass


def is_silu(act_fn: Callable) -> bool:
    """The fused kernels hard-code SiLU; transformers builds it as its own `SiLUActivation`."""
    from transformers.activations import SiLUActivation

    return isinstance(act_fn, (nn.SiLU, SiLUActivation)) or act_fn is torch.nn.functional.silu


def _needs_autograd(tensors: list[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def resolve_backend(
    name: str,
    hidden_states: torch.Tensor,
    act_fn: Callable,
    lora: Optional[ExpertLoraFactors] = None,
    weights: tuple[torch.Tensor, ...] = (),
) -> ExpertsBackend:
    """The backend function for a config's `backend` on this call.

    "auto" runs the Triton kernels for CUDA inference of SiLU experts, and the torch path otherwise
    (training, CPU, other activations).
    """
    if name == "auto":
        tensors = [hidden_states, *weights]
        if lora is not None:
            tensors += [lora.gate_A, lora.gate_B, lora.up_A, lora.up_B, lora.down_A, lora.down_B]
        fused_ok = "triton" in EXPERTS_BACKENDS and hidden_states.is_cuda and is_silu(act_fn)
        name = "triton" if fused_ok and not _needs_autograd(tensors) else "torch"
    try:
        return EXPERTS_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown experts backend {name!r}; available: {sorted(EXPERTS_BACKENDS)} or 'auto'") from None


def transformers_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """A base-only experts implementation for transformers' `ExpertsInterface`."""
    weights = (self.gate_up_proj, self.down_proj)
    backend = resolve_backend("auto", hidden_states, self.act_fn, weights=weights)
    return backend(hidden_states, top_k_index, top_k_weights, *weights, self.act_fn)


def register_transformers_experts_implementation(name: str = "peft_shared_moe") -> None:
    """Make `from_pretrained(..., experts_implementation="peft_shared_moe")` run our kernels."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, transformers_experts_forward)


__all__ = [
    "EXPERTS_BACKENDS",
    "ExpertLoraFactors",
    "ExpertRouting",
    "experts_forward",
    "register_transformers_experts_implementation",
    "resolve_backend",
    "sort_pairs_by_expert",
]
