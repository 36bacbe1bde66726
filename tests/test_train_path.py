"""The "torch_fused" training path (ops/train_experts.py): one autograd function with a hand-written
backward, against the naive float64 loop (values, every gradient; gradcheck in test_ops.py), against the torch path
inside a model (gradient checkpointing, several adapters, short sequences), and its refusals.
T = 1 is covered at the layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_shared_moe import SharedMoeLoraConfig
from peft_shared_moe.ops import EXPERTS_BACKENDS, ExpertsLayout
from tests.conftest import input_ids, load, randomize_adapter
from tests.reference import naive_moe_lora
from tests.test_ops import E, H, I, as_lora, make_problem, rel_err

LAYOUT = ExpertsLayout(E, H, I)
fused = EXPERTS_BACKENDS["torch_fused"]


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("T,k,experts_used", [(1, 2, E), (9, 2, 3), (16, 3, E)])
def test_values_and_gradients_match_the_naive_loop(shared, T, k, experts_used):
    """float64, against autograd through the naive per-token loop; some experts get no token."""
    x, idx, w, gate_up, down, factors = make_problem(T, k, shared, torch.float64, seed=T + k, experts_used=experts_used)
    leaves = [x, w, *factors.values()]
    for t in leaves:
        t.requires_grad_(True)
    probe = torch.randn(T, H, dtype=torch.float64)
    got = fused(x, idx, w, gate_up, down, F.silu, lora=as_lora(factors, 0.6), layout=LAYOUT)
    want = naive_moe_lora(x, idx, w, gate_up, down, factors, 0.6)
    assert rel_err(got, want) < 1e-12
    got_grads = torch.autograd.grad((got * probe).sum(), leaves)
    want_grads = torch.autograd.grad((want * probe).sum(), leaves)
    for name, a, b in zip(["x", "weights", *factors], got_grads, want_grads):
        assert rel_err(a, b) < 1e-12, name


def test_float32_gradients_as_close_to_float64_as_the_torch_path():
    """grouped_mm in float32 on both paths: the fused backward is no noisier than autograd's."""
    x32, idx, w32, gate_up, down, f32 = make_problem(24, 2, True, torch.float32, seed=11)
    x64, w64 = x32.double(), w32.double()
    f64 = {n: v.double() for n, v in f32.items()}
    probe = torch.randn(24, H, dtype=torch.float64)

    def grads(backend, x, w, factors, g, d):
        leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True),
                  *[t.clone().requires_grad_(True) for t in factors.values()]]
        lora = as_lora(dict(zip(factors, leaves[2:])), 0.5)
        out = EXPERTS_BACKENDS[backend](leaves[0], idx, leaves[1], g, d, F.silu, lora=lora, layout=LAYOUT)
        return torch.autograd.grad((out.double() * probe).sum(), leaves)

    exact = grads("loop", x64, w64, f64, gate_up.double(), down.double())
    ours = grads("torch_fused", x32, w32, f32, gate_up, down)
    autograd = grads("torch", x32, w32, f32, gate_up, down)
    for a, b, c in zip(ours, autograd, exact):
        assert rel_err(a, c) <= 2 * rel_err(b, c) + 1e-6


def _trained_grads(path: str, backend: str, *, adapters: int = 1, checkpointing: bool = False, length: int = 9):
    model = load(path, dtype=torch.float64, experts_implementation="eager")
    model = get_peft_model(model, SharedMoeLoraConfig(r=4, lora_alpha=8, backend=backend, init_lora_weights=False))
    randomize_adapter(model, seed=1)
    if adapters == 2:  # two adapters active at once: their factors are concatenated along the rank
        model.add_adapter("second", SharedMoeLoraConfig(r=3, lora_alpha=3, backend=backend, init_lora_weights=False))
        randomize_adapter(model, "second", seed=2)
        model.base_model.set_adapter(["default", "second"])
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    ids = input_ids(length=length)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", [{}, {"checkpointing": True}, {"adapters": 2}, {"length": 2}])
def test_in_a_model_equals_the_torch_path(qwen3_path, variant, monkeypatch):
    from peft_shared_moe.ops import train_experts

    loss_ref, grads_ref = _trained_grads(qwen3_path, "torch", **variant)
    calls = []
    original = train_experts.ExpertsLoraFunction.apply
    monkeypatch.setattr(train_experts.ExpertsLoraFunction, "apply", lambda *a: calls.append(1) or original(*a))
    loss, grads = _trained_grads(qwen3_path, "torch_fused", **variant)
    assert len(calls) >= 2  # each MoE layer ran the fused function (with checkpointing, again in the backward)
    assert torch.allclose(loss, loss_ref, rtol=1e-12, atol=0)
    assert grads.keys() == grads_ref.keys() and len(grads) > 6
    for name, g in grads.items():
        assert g is not None and rel_err(g, grads_ref[name]) < 1e-10, name


def test_refuses_what_it_would_not_compute_exactly():
    x, idx, w, gate_up, down, factors = make_problem(4, 2, True, torch.float64, seed=2)
    lora = as_lora(factors, 0.5)
    with pytest.raises(ValueError, match="SiLU gate"):
        fused(x, idx, w, gate_up, down, F.gelu, lora=lora, layout=LAYOUT)
    with pytest.raises(ValueError, match="expert biases"):
        fused(x, idx, w, gate_up, down, F.silu, lora=lora, layout=LAYOUT, gate_up_bias=torch.zeros(E, 2 * I, dtype=x.dtype))
    with pytest.raises(ValueError, match="base weights require grad"):
        fused(x, idx, w, gate_up.clone().requires_grad_(True), down, F.silu, lora=lora, layout=LAYOUT)
    with pytest.raises(ValueError, match="transposed=True"):
        fused(x, idx, w, gate_up, down, F.silu, lora=lora, layout=ExpertsLayout(E, H, I, transposed=True))
    with pytest.raises(ValueError, match="without the block's layout"):
        fused(x, idx, w, gate_up, down, F.silu, lora=lora, apply_gate=lambda gu: gu[:, :I])
    with pytest.raises(ValueError, match="no adapter"):
        fused(x, idx, w, gate_up, down, F.silu, layout=LAYOUT)


def _saved_bytes(backend: str, shared: bool) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one call (inputs excluded)."""
    x, idx, w, gate_up, down, factors = make_problem(256, 4, shared, torch.float32, seed=3)
    leaves = [x, w, *factors.values()]
    for t in leaves:
        t.requires_grad_(True)
    inputs = {t.untyped_storage().data_ptr() for t in [x, w, gate_up, down, *factors.values()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = EXPERTS_BACKENDS[backend](x, idx, w, gate_up, down, F.silu, lora=as_lora(factors, 0.5), layout=LAYOUT)
    out.sum().backward()
    return sum(kept.values())


@pytest.mark.parametrize("shared", [True, False])
def test_factor_gradients_when_neither_input_nor_weights_need_one(shared):
    """The first layer's input and a frozen router need no gradient: the backward skips theirs (the largest
    GEMM) and the factors' gradients are unchanged."""
    x, idx, w, gate_up, down, factors = make_problem(9, 2, shared, torch.float64, seed=4, experts_used=4)
    for t in factors.values():
        t.requires_grad_(True)
    probe = torch.randn(9, H, dtype=torch.float64)
    got = fused(x, idx, w, gate_up, down, F.silu, lora=as_lora(factors, 0.6), layout=LAYOUT)
    want = naive_moe_lora(x, idx, w, gate_up, down, factors, 0.6)
    for name, a, b in zip(factors, torch.autograd.grad((got * probe).sum(), list(factors.values())),
                          torch.autograd.grad((want * probe).sum(), list(factors.values()))):
        assert rel_err(a, b) < 1e-12, name


@pytest.mark.parametrize("shared", [True, False])
def test_keeps_fewer_activations_than_autograd(shared):
    fused_bytes, torch_bytes = _saved_bytes("torch_fused", shared), _saved_bytes("torch", shared)
    print(f"saved for backward: torch_fused {fused_bytes} B, torch {torch_bytes} B")
    assert fused_bytes < 0.6 * torch_bytes
