"""The experts math (torch backends) against the naive float64 loop, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_shared_moe.ops import EXPERTS_BACKENDS, ExpertLoraFactors, sort_pairs_by_expert
from tests.reference import naive_moe_lora

E, H, I, R = 6, 32, 16, 4


def make_problem(T: int, k: int, shared: bool, dtype, seed: int, experts_used: int = E):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    # Routing over a subset of experts, so some experts get no token.
    allowed = torch.randperm(E, generator=gen)[:experts_used]
    idx = torch.stack([allowed[torch.randperm(experts_used, generator=gen)[:k]] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, k, generator=gen, dtype=torch.float64), -1).to(dtype)
    outer = 1 if shared else E
    factors = {
        "w1.lora_A": rnd(outer, R, H),
        "w1.lora_B": rnd(E, I, R),
        "w3.lora_A": rnd(outer, R, H),
        "w3.lora_B": rnd(E, I, R),
        "w2.lora_A": rnd(E, R, I),
        "w2.lora_B": rnd(outer, H, R),
    }
    return rnd(T, H, scale=1.0), idx, weights, rnd(E, 2 * I, H), rnd(E, H, I), factors


def as_lora(factors: dict, scaling: float) -> ExpertLoraFactors:
    return ExpertLoraFactors(factors, scaling)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_routing_worked_example():
    idx = torch.tensor([[2, 0], [3, 2], [0, 1]])
    routing = sort_pairs_by_expert(idx, torch.rand(3, 2), 4)
    assert routing.pair_order.tolist() == [1, 4, 5, 0, 3, 2]
    assert routing.token_of_pair.tolist() == [0, 2, 2, 0, 1, 1]
    assert routing.tokens_per_expert.tolist() == [2, 1, 2, 1]
    assert routing.group_ends.tolist() == [2, 3, 5, 6]
    rows = torch.arange(6.0).unsqueeze(-1)  # sorted row p holds p
    # token 0 = pairs 0, 1 at sorted rows 3, 0; token 1 = pairs 2, 3 at rows 5, 4; token 2 = rows 1, 2
    assert routing.to_tokens(rows).squeeze(-1).tolist() == [3 + 0, 5 + 4, 1 + 2]


@pytest.mark.parametrize("backend", ["torch", "loop"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("T,k,experts_used", [(1, 2, E), (7, 2, 3), (16, 3, E), (5, 1, 1)])
def test_experts_forward_matches_naive_loop(backend, shared, T, k, experts_used):
    dtype = torch.float64 if backend == "loop" else torch.float32
    x, idx, w, gate_up, down, factors = make_problem(T, k, shared, dtype, seed=T * 10 + k)
    s = 0.75
    got = EXPERTS_BACKENDS[backend](x, idx, w, gate_up, down, F.silu, lora=as_lora(factors, s))
    want = naive_moe_lora(x, idx, w, gate_up, down, factors, s)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(got, want) < tol
    base_only = EXPERTS_BACKENDS[backend](x, idx, w, gate_up, down, F.silu)
    assert rel_err(base_only, naive_moe_lora(x, idx, w, gate_up, down, None, s)) < tol
    assert rel_err(base_only, want) > 1e-3  # the adapter really changes the output


@pytest.mark.parametrize("backend", ["loop", "torch_fused"])  # autograd through the loop; the hand-written backward
@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck_float64(shared, backend):
    x, idx, w, gate_up, down, factors = make_problem(5, 2, shared, torch.float64, seed=3, experts_used=4)
    names = list(factors)
    leaves = [x, w] + [factors[n] for n in names]
    for t in leaves:
        t.requires_grad_(True)

    def fn(x, w, *fs):
        return EXPERTS_BACKENDS[backend](x, idx, w, gate_up, down, F.silu, lora=as_lora(dict(zip(names, fs)), 0.5))

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False])
def test_grouped_gradients_match_naive(shared):
    """The grouped_mm path's gradients (float32) against autograd through the float64 naive loop."""
    x32, idx, w32, gate_up, down, f32 = make_problem(12, 2, shared, torch.float32, seed=5, experts_used=5)
    x64, w64 = x32.double(), w32.double()
    f64 = {k: v.double() for k, v in f32.items()}
    for t in [x32, w32, x64, w64, *f32.values(), *f64.values()]:
        t.requires_grad_(True)
    probe = torch.randn(12, H, dtype=torch.float64)
    got = EXPERTS_BACKENDS["torch"](x32, idx, w32, gate_up, down, F.silu, lora=as_lora(f32, 0.5))
    (got.double() * probe).sum().backward()
    want = naive_moe_lora(x64, idx, w64, gate_up, down, f64, 0.5)
    (want * probe).sum().backward()
    for name in f32:
        assert rel_err(f32[name].grad, f64[name].grad) < 1e-5, name
    assert rel_err(x32.grad, x64.grad) < 1e-5
    assert rel_err(w32.grad, w64.grad) < 1e-5


def test_silu_of_transformers_is_recognised():
    """The Triton path is chosen only for SiLU experts; transformers' own SiLU class must count."""
    from transformers.activations import ACT2FN

    from peft_shared_moe.ops.experts_layout import _is_silu as is_silu

    assert is_silu(ACT2FN["silu"]) and is_silu(torch.nn.SiLU()) and is_silu(F.silu)
    assert not is_silu(ACT2FN["gelu"])


def _gpt_oss_like_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """Interleaved columns, clamps and a sigmoid gate, as GptOssExperts._apply_gate (limit 7, alpha 1.702)."""
    gate, up = gate_up[..., ::2].clamp(max=7.0), gate_up[..., 1::2].clamp(-7.0, 7.0)
    return (up + 1) * gate * torch.sigmoid(1.702 * gate)


def _naive_storage_forward(x, idx, w, gate_up_t, down_t, b_gu, b_down, factors, s):
    """One token and expert at a time, in GPT-OSS storage: gate_up (E, H, 2I) interleaved, down (E, I, H)."""
    out = torch.zeros(x.shape[0], down_t.shape[2], dtype=torch.float64)
    pick = lambda name, e: factors[name][0 if factors[name].shape[0] == 1 else e]  # noqa: E731
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            gate_up = x[t] @ gate_up_t[e] + b_gu[e]
            gate_up = gate_up.clone()
            gate_up[0::2] += s * pick("w1.lora_B", e) @ (pick("w1.lora_A", e) @ x[t])
            gate_up[1::2] += s * pick("w3.lora_B", e) @ (pick("w3.lora_A", e) @ x[t])
            h = _gpt_oss_like_gate(gate_up)
            o = h @ down_t[e] + b_down[e] + s * pick("w2.lora_B", e) @ (pick("w2.lora_A", e) @ h)
            out[t] += w[t, k] * o
    return out


@pytest.mark.parametrize("shared", [True, False])
def test_transposed_interleaved_biased_layout_values_and_gradcheck(shared):
    """GPT-OSS storage through the exact loop: values against the naive loop, gradients by gradcheck."""
    from peft_shared_moe.ops import ExpertsLayout

    x, idx, w, gate_up, down, factors = make_problem(5, 2, shared, torch.float64, seed=8, experts_used=4)
    gate_up_t, down_t = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()  # (E, H, 2I), (E, I, H)
    gen = torch.Generator().manual_seed(2)
    b_gu, b_down = torch.randn(E, 2 * I, generator=gen, dtype=torch.float64), torch.randn(E, H, generator=gen, dtype=torch.float64)
    layout = ExpertsLayout(E, H, I, transposed=True, interleaved=True, has_bias=True, silu_gate=False, own_gate=True)
    assert not layout.fused_kernels_ok
    names = list(factors)

    def fn(x, w, b_gu, b_down, *fs):
        lora = as_lora(dict(zip(names, fs)), 0.5)
        return EXPERTS_BACKENDS["loop"](
            x, idx, w, gate_up_t, down_t, None, lora=lora,
            layout=layout, apply_gate=_gpt_oss_like_gate, gate_up_bias=b_gu, down_bias=b_down,
        )

    want = _naive_storage_forward(x, idx, w, gate_up_t, down_t, b_gu, b_down, factors, 0.5)
    assert rel_err(fn(x, w, b_gu, b_down, *factors.values()), want) < 1e-12
    leaves = [x, w, b_gu, b_down] + [factors[n] for n in names]
    for t in leaves:
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6)


def test_storage_deltas_place_gate_and_up_rows():
    """Merge placement: gate on even, up on odd gate_up columns of a transposed interleaved block."""
    from peft_shared_moe.ops import ExpertsLayout

    gate, up, down = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 4, 3)
    plain = ExpertsLayout(2, 4, 3).storage_deltas(gate, up, down)
    assert torch.equal(plain["gate_up_proj"], torch.cat([gate, up], 1)) and torch.equal(plain["down_proj"], down)
    oss = ExpertsLayout(2, 4, 3, transposed=True, interleaved=True).storage_deltas(gate, up, down)
    assert oss["gate_up_proj"].shape == (2, 4, 6) and oss["down_proj"].shape == (2, 3, 4)
    assert torch.equal(oss["gate_up_proj"][:, :, 0::2], gate.transpose(1, 2))
    assert torch.equal(oss["gate_up_proj"][:, :, 1::2], up.transpose(1, 2))
    assert torch.equal(oss["down_proj"], down.transpose(1, 2))


def test_describe_experts_without_flags_reads_shapes_and_refuses_what_it_cannot_know():
    """An undecorated block (no transformers flags): storage read from the shapes, H == 2I included."""
    from peft_shared_moe.ops import UnsupportedExpertsError, describe_experts

    class Experts(torch.nn.Module):
        def __init__(self, gate_up_shape, down_shape):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(gate_up_shape))
            self.down_proj = torch.nn.Parameter(torch.zeros(down_shape))
            self.act_fn = torch.nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise NotImplementedError

    # H = 2I = 8: gate_up alone is (E, 8, 8) either way; down decides.
    plain = describe_experts(Experts((3, 8, 8), (3, 8, 4)))
    assert not plain.transposed and (plain.hidden, plain.inter) == (8, 4) and plain.fused_kernels_ok
    transposed = describe_experts(Experts((3, 8, 8), (3, 4, 8)))
    assert transposed.transposed and (transposed.hidden, transposed.inter) == (8, 4) and not transposed.fused_kernels_ok
    with pytest.raises(UnsupportedExpertsError, match="Experts.*fit neither"):
        describe_experts(Experts((3, 8, 6), (3, 5, 6)))
    biased = Experts((3, 8, 6), (3, 6, 4))
    biased.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(3, 8))
    with pytest.raises(UnsupportedExpertsError, match="no has_bias flag"):
        describe_experts(biased)
