"""The Triton fused experts kernels (the interpreter on CPU, the GPU where there is one) against the
naive float64 loop, over the routing edge cases, ranks, both layouts and adapter switching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_shared_moe import SharedMoeLoraConfig
from peft_shared_moe.ops import EXPERTS_BACKENDS
from peft_shared_moe.ops.block_routing import align_pairs_to_blocks
from peft_shared_moe.tuners import ExpertsLoraLayer
from tests.conftest import input_ids, load, randomize_adapter
from tests.reference import naive_moe_lora
from tests.test_ops import E, as_lora, make_problem, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_forward = EXPERTS_BACKENDS["triton"]
# float32 dots run as tf32 on the GPU; the interpreter computes them in full float32
TOL = {torch.float32: 5e-3 if DEVICE == "cuda" else 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def run_triton(x, idx, w, gate_up, down, factors, scaling):
    lora = None
    if factors is not None:
        lora = as_lora({k: v.to(DEVICE) for k, v in factors.items()}, scaling)
    out = triton_forward(x.to(DEVICE), idx.to(DEVICE), w.to(DEVICE), gate_up.to(DEVICE), down.to(DEVICE), F.silu, lora=lora)
    return out.cpu()


def test_block_routing_worked_example():
    routing = align_pairs_to_blocks(torch.tensor([[2, 0], [0, 1], [0, 2]], device=DEVICE), 3, 4)
    S = 6
    assert routing.sorted_pair_ids[:12].tolist() == [1, 2, 4, S, 3, S, S, S, 0, 5, S, S]
    assert routing.expert_of_block[:3].tolist() == [0, 1, 2]
    assert (routing.expert_of_block[3:] == 3).all()
    assert routing.num_padded_rows.tolist() == [12]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize(
    "T,k,experts_used",
    [(1, 2, E), (7, 2, 3), (37, 3, E), (19, 1, 1)],  # T = 1, empty experts, T % block != 0, one expert
)
def test_kernels_match_naive_loop(dtype, shared, T, k, experts_used):
    x, idx, w, gate_up, down, factors = make_problem(T, k, shared, dtype, seed=T + k)
    want = naive_moe_lora(x, idx, w, gate_up, down, factors, 0.5)
    assert rel_err(run_triton(x, idx, w, gate_up, down, factors, 0.5), want) < TOL[dtype]
    base = naive_moe_lora(x, idx, w, gate_up, down, None, 0.5)
    assert rel_err(run_triton(x, idx, w, gate_up, down, None, 0.5), base) < TOL[dtype]


@pytest.mark.parametrize("rank", [8, 16, 32, 64])
@pytest.mark.parametrize("shared", [True, False])
def test_kernels_every_rank(rank, shared):
    import tests.test_ops as ops_tests

    old, ops_tests.R = ops_tests.R, rank
    try:
        x, idx, w, gate_up, down, factors = make_problem(9, 2, shared, torch.float32, seed=rank)
    finally:
        ops_tests.R = old
    assert factors["w1.lora_A"].shape[1] == rank
    want = naive_moe_lora(x, idx, w, gate_up, down, factors, 16 / rank)
    assert rel_err(run_triton(x, idx, w, gate_up, down, factors, 16 / rank), want) < TOL[torch.float32]


def poison_allocator() -> None:
    """Leave NaNs in memory the allocator hands out next, so a read of an unwritten buffer shows."""
    junk = torch.full((1 << 22,), float("nan"), device=DEVICE)
    del junk


def test_switching_resident_adapters_of_different_ranks(qwen3_path):
    """Adapters of rank 16 and 4 stay packed side by side; each call reads only its own factors."""
    model = get_peft_model(load(qwen3_path, device_map=DEVICE), SharedMoeLoraConfig(r=16, backend="triton"), "big")
    model.add_adapter("small", SharedMoeLoraConfig(r=4, lora_alpha=8, shared_outer=False, backend="triton"))
    randomize_adapter(model, "big", seed=1)
    randomize_adapter(model, "small", seed=2)
    layer = next(m for m in model.modules() if isinstance(m, ExpertsLoraLayer))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 32, generator=gen).to(DEVICE)
    idx = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(11)]).to(DEVICE)
    w = torch.rand(11, 2, generator=gen).to(DEVICE)
    outputs = {}
    with torch.no_grad():
        for name in ["big", "small", "big", "small"]:
            model.set_adapter(name)
            poison_allocator()
            got = layer(x, idx, w)
            layer.backend[name] = "torch"
            want = layer(x, idx, w)
            layer.backend[name] = "triton"
            assert rel_err(got, want) < TOL[torch.float32], name
            outputs.setdefault(name, got)
            assert torch.equal(outputs[name], got)  # no stale packed values after a switch
        # a modified factor is repacked, not served stale
        layer.w1.lora_B["small"].weight.mul_(2)
        model.set_adapter("small")
        assert not torch.equal(layer(x, idx, w), outputs["small"])


def test_transformers_experts_implementation(qwen3_path):
    ids = input_ids()
    with torch.no_grad():
        want = load(qwen3_path)(input_ids=ids).logits
        model = load(qwen3_path, experts_implementation="peft_shared_moe", device_map=DEVICE)
        got = model(input_ids=ids.to(DEVICE)).logits.cpu()
    assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [8, 16, 32, 64])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("T", [1, 64, 300])
def test_bf16_kernels_against_float64_on_gpu(rank, shared, T):
    import tests.test_ops as ops_tests

    gen = torch.Generator().manual_seed(rank + T)
    e, h, i, k = 16, 256, 128, 4
    rnd = lambda *s, scale=0.05: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale)  # noqa: E731
    x = rnd(T, h, scale=1.0)
    idx = torch.stack([torch.randperm(e - 3, generator=gen)[:k] for _ in range(T)])  # 3 experts get no token
    w = torch.softmax(torch.randn(T, k, generator=gen, dtype=torch.float64), -1)
    outer = 1 if shared else e
    factors = {"w1.lora_A": rnd(outer, rank, h), "w1.lora_B": rnd(e, i, rank), "w3.lora_A": rnd(outer, rank, h),
               "w3.lora_B": rnd(e, i, rank), "w2.lora_A": rnd(e, rank, i), "w2.lora_B": rnd(outer, h, rank)}
    gate_up, down = rnd(e, 2 * i, h), rnd(e, h, i)
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    got = run_triton(bf(x), idx, bf(w), bf(gate_up), bf(down), {n: v.float() for n, v in factors.items()}, 2.0)
    # the reference sees the same bf16-rounded inputs, in float64
    want = naive_moe_lora(bf(x), idx, bf(w), bf(gate_up), bf(down), factors, 2.0)
    assert not torch.isnan(got).any()
    assert ops_tests.rel_err(got, want) < 1e-2


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    x, idx, w, gate_up, down, factors = make_problem(8, 2, True, torch.bfloat16, seed=1)
    x, idx, w, gate_up, down = (t.cuda() for t in (x, idx, w, gate_up, down))
    lora = as_lora({n: v.float().cuda() for n, v in factors.items()}, 0.5)
    run = lambda: triton_forward(x, idx, w, gate_up, down, F.silu, lora=lora)  # noqa: E731
    run()  # compile and pack outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x2, idx2, w2, *_ = make_problem(8, 2, True, torch.bfloat16, seed=2)
    x.copy_(x2), idx.copy_(idx2), w.copy_(w2)
    graph.replay()
    want = naive_moe_lora(x2, idx2, w2, gate_up.cpu(), down.cpu(), factors, 0.5)
    assert rel_err(out.cpu(), want) < 2e-2


@pytest.mark.gpu
def test_compiled_generate_with_static_cache(qwen3_path):
    model = get_peft_model(load(qwen3_path, dtype=torch.bfloat16, device_map="cuda"), SharedMoeLoraConfig(r=8))
    randomize_adapter(model, seed=3, scale=0.05)
    model.eval()
    ids = input_ids(length=6).cuda()
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    eager = model.generate(**kwargs)
    inner = model.base_model.model
    inner.forward = torch.compile(inner.forward, dynamic=False)
    compiled = model.generate(**kwargs, cache_implementation="static")
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("T,k,num_experts,block_m", [(1, 8, 128, 16), (3, 2, 3, 4), (64, 8, 128, 16), (37, 3, 6, 16)])
def test_small_routing_kernel_equals_torch_alignment(T, k, num_experts, block_m):
    from peft_shared_moe.ops.block_routing import _align_small, _align_torch

    gen = torch.Generator().manual_seed(T)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(T)]).to(DEVICE)
    fast, slow = _align_small(idx, num_experts, block_m), _align_torch(idx, num_experts, block_m)
    assert torch.equal(fast.sorted_pair_ids, slow.sorted_pair_ids)
    assert torch.equal(fast.expert_of_block, slow.expert_of_block)
    assert torch.equal(fast.num_padded_rows, slow.num_padded_rows)


def test_custom_op_matches_direct_call():
    """The torch.library op (what torch.compile sees) computes what the eager path computes."""
    from peft_shared_moe.ops.triton_experts import pack_lora

    x, idx, w, gate_up, down, factors = make_problem(6, 2, True, torch.float32, seed=8)
    x, idx, w, gate_up, down = (t.to(DEVICE) for t in (x, idx, w, gate_up, down))
    lora = as_lora({n: v.to(DEVICE) for n, v in factors.items()}, 0.5)
    p = pack_lora(lora, x.dtype)
    via_op = torch.ops.peft_shared_moe.fused_experts(x, idx, w, gate_up, down, p.gate_up_A, p.gate_up_B, p.down_A, p.down_B, 0.5)
    torch.testing.assert_close(via_op, triton_forward(x, idx, w, gate_up, down, F.silu, lora=lora))
    base_op = torch.ops.peft_shared_moe.fused_experts(x, idx, w, gate_up, down, None, None, None, None, 0.0)
    torch.testing.assert_close(base_op, triton_forward(x, idx, w, gate_up, down, F.silu))


@pytest.mark.gpu
def test_model_logits_triton_path_against_torch_path(qwen3_path, monkeypatch):
    """A multi-layer model: "auto" under no_grad (Triton) against the torch path, bf16."""
    calls = []
    monkeypatch.setitem(EXPERTS_BACKENDS, "triton", lambda *a, **k: calls.append(1) or triton_forward(*a, **k))
    model = get_peft_model(load(qwen3_path, dtype=torch.bfloat16, device_map="cuda"), SharedMoeLoraConfig(r=8))
    randomize_adapter(model, seed=4, scale=0.05)
    ids = input_ids(batch=3, length=12).cuda()
    with torch.no_grad():
        fused = model(input_ids=ids).logits.float()
        assert len(calls) == 2  # both MoE layers took the Triton path
        for layer in model.modules():
            if isinstance(layer, ExpertsLoraLayer):
                layer.backend["default"] = "torch"
        reference = model(input_ids=ids).logits.float()
    assert ((fused - reference).norm() / reference.norm()) < 2e-2
