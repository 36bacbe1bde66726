"""The mixed-adapter Triton kernels (ops/triton_mixed.py; the interpreter on CPU, the GPU where there is
one): each token with its own adapter, against the naive float64 loop run token by token with that
token's adapter. Adapters differ in rank and in which outer factors are shared; tokens without an
adapter equal the base; bad input is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_shared_moe.ops import ExpertLoraFactors, ExpertsLayout
from peft_shared_moe.ops.triton_mixed import triton_mixed_experts_forward
from peft_shared_moe.ops.triton_support import TritonBackendError
from tests.reference import naive_moe_lora
from tests.test_ops import E, H, I, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-2}


def adapter(rank: int, shared_a: bool, shared_b: bool, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3

    a_outer, b_outer = (1 if shared_a else E), (1 if shared_b else E)
    return {
        "w1.lora_A": rnd(a_outer, rank, H), "w1.lora_B": rnd(E, I, rank),
        "w3.lora_A": rnd(a_outer, rank, H), "w3.lora_B": rnd(E, I, rank),
        "w2.lora_A": rnd(E, rank, I), "w2.lora_B": rnd(b_outer, H, rank),
    }


# (rank, shared A, shared B, scaling): shared-outer, per-expert, and the two half-shared mixes
ADAPTERS = [(4, True, True, 0.5), (8, False, False, 2.0), (3, True, False, 1.0), (5, False, True, 0.7)]


def problem(T: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=gen, dtype=torch.float64), -1)
    gate_up = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64) * 0.2
    down = torch.randn(E, H, I, generator=gen, dtype=torch.float64) * 0.2
    return x, idx, w, gate_up, down


def reference(x, idx, w, gate_up, down, adapters, slots) -> torch.Tensor:
    rows = []
    for t, slot in enumerate(slots):
        factors, scaling = (adapters[slot] if slot >= 0 else (None, 0.0))
        rows.append(naive_moe_lora(x[t:t + 1], idx[t:t + 1], w[t:t + 1], gate_up, down, factors, scaling))
    return torch.cat(rows)


def run(x, idx, w, gate_up, down, adapters, slots, dtype, factor_dtype=torch.float32):
    loras = [ExpertLoraFactors({f: t.to(DEVICE, factor_dtype) for f, t in a.items()}, s) for a, s in adapters]
    return triton_mixed_experts_forward(
        x.to(DEVICE, dtype), idx.to(DEVICE), w.to(DEVICE, dtype), gate_up.to(DEVICE, dtype), down.to(DEVICE, dtype),
        loras, torch.tensor(slots, device=DEVICE), layout=ExpertsLayout(E, H, I),
    ).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,k", [(1, 2), (7, 2), (37, 3)])
def test_each_token_gets_its_own_adapter(dtype, T, k):
    x, idx, w, gate_up, down = problem(T, k, seed=T)
    adapters = [(adapter(r, sa, sb, seed=i), s) for i, (r, sa, sb, s) in enumerate(ADAPTERS)]
    slots = [(t * 3) % (len(adapters) + 1) - 1 for t in range(T)]  # every slot and -1 (no adapter)
    want = reference(x, idx, w, gate_up, down, adapters, slots)
    got = run(x, idx, w, gate_up, down, adapters, slots, dtype)
    assert rel_err(got, want) < TOL[dtype]
    base_rows = [t for t, s in enumerate(slots) if s < 0]
    if base_rows:  # no adapter: exactly the base experts
        base = naive_moe_lora(x[base_rows], idx[base_rows], w[base_rows], gate_up, down, None, 0.0)
        assert rel_err(got[base_rows], base) < TOL[dtype]


@pytest.mark.parametrize("layouts", [[(4, True, True, 0.5)], [(8, False, False, 2.0)], [(4, True, True, 0.5), (16, True, True, 1.5)]])
def test_one_layout_at_a_time_and_a_rank_of_16(layouts):
    """Only shared or only per-expert slots (one of the two shrink passes absent), and a padded rank."""
    x, idx, w, gate_up, down = problem(20, 2, seed=3)
    adapters = [(adapter(r, sa, sb, seed=10 + i), s) for i, (r, sa, sb, s) in enumerate(layouts)]
    slots = [t % len(adapters) for t in range(20)]
    want = reference(x, idx, w, gate_up, down, adapters, slots)
    assert rel_err(run(x, idx, w, gate_up, down, adapters, slots, torch.float32), want) < 1e-5


def test_a_token_count_of_zero():
    x, idx, w, gate_up, down = problem(3, 2, seed=1)
    adapters = [(adapter(4, True, True, seed=0), 1.0)]
    got = run(x[:0], idx[:0], w[:0], gate_up, down, adapters, [], torch.float32)
    assert got.shape == (0, H)


def test_bad_input_is_refused():
    x, idx, w, gate_up, down = problem(4, 2, seed=2)
    good = [(adapter(4, True, True, seed=0), 1.0)]
    with pytest.raises(ValueError, match=r"token_slot must give one slot per token, shape \(4,\)"):
        run(x, idx, w, gate_up, down, good, [0, 0, 0], torch.float32)
    bad = adapter(4, True, True, seed=0)
    bad["w2.lora_B"] = bad["w2.lora_B"][:, :-1]
    with pytest.raises(ValueError, match=r"adapter slot 0: w2.lora_B is \(1, 31, 4\)"):
        run(x, idx, w, gate_up, down, [(bad, 1.0)], [0, 0, 0, 0], torch.float32)
    with pytest.raises(ValueError, match="at least one adapter"):
        run(x, idx, w, gate_up, down, [], [-1] * 4, torch.float32)


def test_autograd_and_other_gates_are_refused():
    x, idx, w, gate_up, down = problem(4, 2, seed=2)
    lora = ExpertLoraFactors({f: t.float().requires_grad_() for f, t in adapter(4, True, True, seed=0).items()}, 1.0)
    args = (x.float(), idx, w.float(), gate_up.float(), down.float(), [lora], torch.zeros(4, dtype=torch.long))
    with pytest.raises(TritonBackendError, match="mixed-adapter batches are for inference"):
        triton_mixed_experts_forward(*args)
    with torch.no_grad(), pytest.raises(TritonBackendError, match="SiLU gate"):
        triton_mixed_experts_forward(*args, layout=ExpertsLayout(E, H, I, silu_gate=False))


def test_linear_lora_of_a_mixed_batch():
    """Each row's delta of its own adapter (ranks 4, 8, 19; -1: none) added to the base output, against float64."""
    from peft_shared_moe.ops.triton_mixed import mixed_linear_lora, mixed_linear_lora_refusals

    gen = torch.Generator().manual_seed(5)
    K, N = 40, 72  # 3 samples of 11 tokens each
    factors = [(torch.randn(r, K, generator=gen, dtype=torch.float64), torch.randn(N, r, generator=gen, dtype=torch.float64))
               for r in (4, 8, 19)]
    scalings = [0.5, 2.0, 1.25]
    x = torch.randn(3, 11, K, generator=gen, dtype=torch.float64)
    base = torch.randn(3, 11, N, generator=gen, dtype=torch.float64)
    sample_slot = [2, -1, 0]
    want = base.clone()
    for b, s in enumerate(sample_slot):
        if s >= 0:
            want[b] += scalings[s] * x[b] @ factors[s][0].T @ factors[s][1].T
    for dtype in (torch.float32, torch.float16):
        out = base.to(DEVICE, dtype)
        on_device = [(a.to(DEVICE, torch.float32), b.to(DEVICE, torch.float32)) for a, b in factors]
        xd = x.to(DEVICE, dtype)
        assert mixed_linear_lora_refusals(xd, out, on_device) == []
        row_slot = torch.tensor(sample_slot, dtype=torch.int32).repeat_interleave(11).to(DEVICE)
        got = mixed_linear_lora(out, xd, on_device, scalings, row_slot)
        assert torch.equal(out.cpu(), base.to(dtype))  # the base output is left as it was
        assert rel_err(got.cpu(), want) < TOL[dtype]
        assert torch.equal(got[1].cpu(), base[1].to(dtype))  # no adapter: the base output untouched


def test_linear_lora_refusals():
    from peft_shared_moe.ops.triton_mixed import mixed_linear_lora_refusals

    x, out = torch.randn(4, 8, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    a, b = torch.randn(2, 8, device=DEVICE), torch.randn(6, 2, device=DEVICE)
    assert "no backward" in " ".join(mixed_linear_lora_refusals(x, out, [(a.requires_grad_(), b)]))
    a = a.detach()
    assert "share one" in " ".join(mixed_linear_lora_refusals(x, out, [(a, b.half())]))
    assert "share one" in " ".join(mixed_linear_lora_refusals(x.double(), out.double(), [(a.double(), b.double())]))
    assert "not contiguous" in " ".join(mixed_linear_lora_refusals(x, out.T.contiguous().T, [(a, b)]))


def test_slot_indices_out_of_range_and_mismatched_rows_are_refused():
    from peft_shared_moe.ops.triton_mixed import mixed_linear_lora

    x, idx, w, gate_up, down = problem(4, 2, seed=2)
    good = [(adapter(4, True, True, seed=0), 1.0)]
    with pytest.raises(ValueError, match=r"slot indices must lie in \[-1, 1\)"):
        run(x, idx, w, gate_up, down, good, [0, 1, 0, -1], torch.float32)
    a, b = torch.randn(2, 8, device=DEVICE), torch.randn(6, 2, device=DEVICE)
    with pytest.raises(ValueError, match="same rows"):
        mixed_linear_lora(torch.zeros(5, 6, device=DEVICE), torch.randn(4, 8, device=DEVICE), [(a, b)], [1.0],
                          torch.zeros(4, dtype=torch.int32))


def test_adapters_of_different_dtypes_are_refused_not_cast():
    from peft_shared_moe.ops.triton_mixed import mixed_refusals

    x, idx, w, gate_up, down = problem(4, 2, seed=2)
    loras = [ExpertLoraFactors({f: t.to(DEVICE, dtype) for f, t in adapter(4, True, True, seed=s).items()}, 1.0)
             for s, dtype in ((0, torch.float32), (1, torch.float16))]
    with torch.no_grad():
        reasons = mixed_refusals(x.float().to(DEVICE), (gate_up.float().to(DEVICE), down.float().to(DEVICE)), loras)
    assert any("share one dtype" in r for r in reasons)
