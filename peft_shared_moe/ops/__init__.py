"""The math of the library: experts compute backends behind one switch, chosen by name.

`EXPERTS_BACKENDS` maps a name to a function with the contract of `torch_experts.experts_forward`
(minus `linear`): "torch" (grouped GEMMs, autograd), "loop" (exact per-expert loop), "torch_fused"
(training as one autograd function that keeps fewer activations, `train_experts.py`), and "triton"
(fused kernels: inference, and training with a frozen base, `triton_train.py`) where triton imports. `resolve_backend("auto", ...)` picks per call.

Every backend takes `fn(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn, lora=,
layout=, apply_gate=, gate_up_bias=, down_bias=)` (`run_experts` makes the call): the torch ones run
every layout `describe_experts` accepts, the Triton one refuses what its kernels do not implement.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .experts_layout import ExpertsLayout, UnsupportedExpertsError, describe_experts, gate_function
from .routing import ExpertRouting, sort_pairs_by_expert
from .torch_experts import ExpertLoraFactors, experts_forward, grouped_mm_linear, loop_grouped_linear
from .train_experts import train_experts_forward

ExpertsBackend = Callable[..., torch.Tensor]

EXPERTS_BACKENDS: dict[str, ExpertsBackend] = {
    "torch": partial(experts_forward, linear=grouped_mm_linear),
    "loop": partial(experts_forward, linear=loop_grouped_linear),
    "torch_fused": train_experts_forward,
}

try:
    from .triton_experts import triton_experts_forward

    EXPERTS_BACKENDS["triton"] = triton_experts_forward
except ImportError:  # triton is optional at run time; the torch paths cover every case
    pass


def resolve_backend(
    name: str,
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    layout: ExpertsLayout,
    lora: Optional[ExpertLoraFactors] = None,
    weights: tuple[torch.Tensor, ...] = (),
) -> ExpertsBackend:
    """The backend function for a config's `backend` on this call; `weights` are (gate_up_proj, down_proj).

    It sees every tensor of the call (a trainable router makes `top_k_weights` need a gradient).

    "triton" raises `TritonBackendError` wherever the kernels would not compute the exact result
    (base weights needing gradients, a layout or gate they do not implement, no CUDA device, triton
    missing, ...): computing something else silently is never an option. "auto" runs the kernels on
    CUDA, for inference and for training, where none of these holds, and the exact torch path
    otherwise. The kernels' checks run
    here once; the function returned for them does not repeat them.
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

        reasons = triton_experts.triton_refusals(hidden_states, weights, lora, top_k_weights=top_k_weights, layout=layout)
        if name == "triton" and reasons:
            raise TritonBackendError.from_reasons(reasons)
        on_auto = not reasons and hidden_states.device.type in triton_experts.AUTO_DEVICE_TYPES
        if name == "triton" or on_auto:
            return partial(EXPERTS_BACKENDS["triton"], refusals_checked=True)
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
    """One experts block's forward (base experts plus an optional adapter) on the chosen backend,
    given the block's storage flags, its own gate function and its biases."""
    weights = (experts.gate_up_proj, experts.down_proj)
    biases = (experts.gate_up_proj_bias, experts.down_proj_bias) if layout.has_bias else (None, None)
    fn = resolve_backend(backend, hidden_states, top_k_weights, layout, lora, weights)
    return fn(
        hidden_states, top_k_index, top_k_weights, *weights, getattr(experts, "act_fn", None), lora=lora,
        layout=layout, apply_gate=gate_function(experts, layout), gate_up_bias=biases[0], down_bias=biases[1],
    )


def run_mixed_experts(
    experts: nn.Module,
    layout: ExpertsLayout,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    adapters: list[ExpertLoraFactors],
    backends: list[str],
    token_slot: torch.Tensor,
) -> Optional[torch.Tensor]:
    """A mixed-adapter batch (token t gets `adapters[token_slot[t]]`, none where -1) in one call of the
    mixed Triton kernels, where every adapter's backend is "auto" or "triton" and they compute this call
    exactly (`triton_mixed.mixed_refusals`; auto: on CUDA), eagerly. None otherwise: the caller then runs each
    adapter's tokens on that adapter's own backend, which also raises what an explicit "triton" refuses."""
    if "triton" not in EXPERTS_BACKENDS or any(b not in ("auto", "triton") for b in backends):
        return None
    if _holds_no_addresses():
        return None
    from . import triton_experts
    from .triton_mixed import mixed_adapter_problems, mixed_refusals, triton_mixed_experts_forward

    weights = (experts.gate_up_proj, experts.down_proj)
    if mixed_refusals(hidden_states, weights, adapters, top_k_weights=top_k_weights, layout=layout):
        return None
    if mixed_adapter_problems(adapters, layout.num_experts, layout.hidden, layout.inter):
        return None
    if "triton" not in backends and hidden_states.device.type not in triton_experts.AUTO_DEVICE_TYPES:
        return None
    return triton_mixed_experts_forward(hidden_states, top_k_index, top_k_weights, *weights, adapters, token_slot,
                                        refusals_checked=True)


def mixed_linear_lora(
    result: torch.Tensor,
    x: torch.Tensor,
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    scalings: list[float],
    row_slot: torch.Tensor,
) -> Optional[torch.Tensor]:
    """`result` (a linear's base output) plus, per row, its slot's LoRA delta, in one kernel launch
    (`triton_mixed.mixed_linear_lora`), where the kernel computes exactly PEFT's delta; else None and
    the caller adds each adapter's delta on its rows."""
    if "triton" not in EXPERTS_BACKENDS or _holds_no_addresses():
        return None
    from . import triton_mixed

    if triton_mixed.mixed_linear_lora_refusals(x, result, factors):
        return None
    return triton_mixed.mixed_linear_lora(result, x, factors, scalings, row_slot)


def _holds_no_addresses() -> bool:
    """The mixed kernels read their adapters through a table of raw addresses, built and cached per
    content on the host: not inside a traced graph, nor a CUDA graph capture (its replays would keep
    reading a table the cache may have let go)."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


IMPLEMENTATION_NAME = "peft_shared_moe"


class _DispatchToUs:
    """An experts block's config, seen through: only `_experts_implementation` reads as ours."""

    _experts_implementation = IMPLEMENTATION_NAME

    def __init__(self, config: object) -> None:
        self._config = config

    def __getattr__(self, name: str):
        return getattr(self._config, name)


@dataclass(frozen=True)
class AdapterCall:
    """An adapter to add inside one call of a block's own (parallel-hooked) forward.

    transformers' tensor / expert parallel styles wrap an experts block's forward: they make its
    inputs and weights local, move tokens, then call the block's class forward, which dispatches on
    `config._experts_implementation`. For the length of one call, `installed_on` points that dispatch
    at `transformers_experts_forward`, which finds this object on the block and adds the adapter
    (`factors()` gives this rank's shards) to the base experts it computes.
    """

    factors: Callable[[], ExpertLoraFactors]
    backend: str
    skips_foreign_experts: bool  # expert parallel: routes to other ranks' experts come as index E_local

    @contextmanager
    def installed_on(self, experts: nn.Module) -> Iterator[None]:
        config = experts.__dict__.get("config")
        experts.__dict__["config"] = _DispatchToUs(config)
        experts.__dict__["_shared_moe_call"] = self
        try:
            yield
        finally:
            experts.__dict__["config"] = config
            del experts.__dict__["_shared_moe_call"]


def transformers_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """An experts implementation for transformers' `ExpertsInterface`: base experts on our backends,
    plus the adapter of an `AdapterCall` in progress on this block (tensor / expert parallel)."""
    call: Optional[AdapterCall] = self.__dict__.get("_shared_moe_call")
    layout = _cached_layout(self)  # of the weights it holds now: this rank's shards inside a parallel hook
    if (call is not None and call.skips_foreign_experts) or _is_expert_parallel(self):
        layout = replace(layout, skips_foreign_experts=True)
    if call is None:
        return run_experts(self, layout, hidden_states, top_k_index, top_k_weights)
    return run_experts(self, layout, hidden_states, top_k_index, top_k_weights, call.factors(), call.backend)


def _is_expert_parallel(experts: nn.Module) -> bool:
    """transformers' expert parallelism routes to other ranks' experts with index E_local: the flag is
    `_is_expert_parallel` (>= 5.21) or the model's `DistributedConfig(enable_expert_parallel=True)` (5.17)."""
    if getattr(experts, "_is_expert_parallel", False):
        return True
    distributed = getattr(getattr(experts, "config", None), "distributed_config", None)
    return bool(getattr(distributed, "enable_expert_parallel", False))


def _cached_layout(experts: nn.Module) -> ExpertsLayout:
    # describe_experts reads flags, shapes and the forward's signature: once per block, not per call
    # (the adapter layer keeps its own); redone only if the weights' shapes change.
    shapes = (experts.gate_up_proj.shape, experts.down_proj.shape)
    cached = experts.__dict__.get("_shared_moe_layout")
    if cached is None or cached[0] != shapes:
        layout = describe_experts(experts)  # raises for a block it recognises but cannot run exactly
        if layout is None:
            raise UnsupportedExpertsError(
                f"{type(experts).__name__} is not a fused experts block with gate_up_proj and down_proj: "
                f"experts_implementation='peft_shared_moe' cannot run it"
            )
        cached = (shapes, layout)
        experts.__dict__["_shared_moe_layout"] = cached
    return cached[1]


def register_transformers_experts_implementation(name: str = IMPLEMENTATION_NAME) -> None:
    """Make `from_pretrained(..., experts_implementation="peft_shared_moe")` run our kernels."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, transformers_experts_forward)
    try:  # FineGrainedFP8's experts dispatch through their own registry (adopted by quantize_experts)
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    except ImportError:
        return
    ALL_FP8_EXPERTS_FUNCTIONS.register(name, transformers_experts_forward)


__all__ = [
    "AdapterCall",
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
    "run_mixed_experts",
    "mixed_linear_lora",
    "sort_pairs_by_expert",
]
