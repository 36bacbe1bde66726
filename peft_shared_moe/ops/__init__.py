"""The math of the library: experts compute backends behind one switch, chosen by name.

`EXPERTS_BACKENDS` maps a backend name to a function with the signature of
`torch_experts.experts_forward` minus `linear`. A new backend (the Triton inference kernels)
registers itself here; `resolve_backend("auto", ...)` picks the best one for the call.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from .routing import ExpertRouting, sort_pairs_by_expert
from .torch_experts import ExpertLoraFactors, experts_forward, grouped_mm_linear, loop_grouped_linear

ExpertsBackend = Callable[..., torch.Tensor]

EXPERTS_BACKENDS: dict[str, ExpertsBackend] = {
    "torch": partial(experts_forward, linear=grouped_mm_linear),
    "loop": partial(experts_forward, linear=loop_grouped_linear),
}


def resolve_backend(name: str, hidden_states: torch.Tensor) -> ExpertsBackend:
    """The backend function for a config's `backend` on this input."""
    if name == "auto":
        name = "torch"
    try:
        return EXPERTS_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown experts backend {name!r}; registered: {sorted(EXPERTS_BACKENDS)} or 'auto'") from None


__all__ = [
    "EXPERTS_BACKENDS",
    "ExpertLoraFactors",
    "ExpertRouting",
    "experts_forward",
    "resolve_backend",
    "sort_pairs_by_expert",
]
