"""The Triton fused experts kernels (the interpreter on CPU, the GPU where there is one) against the
naive float64 loop, over the routing edge cases, ranks, both layouts and adapter switching; what
`backend="triton"` refuses and where "auto" falls back; the float32 precision; adapter packing that
follows every kind of factor update."""

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
# float32 dots run in full float32 (torch's default matmul precision "highest"), on the GPU and in the interpreter
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


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


def test_gate_and_up_B_with_different_strides():
    """The kernel reads gate B and up B in place through one set of strides; an up B laid out
    otherwise (here column-major per expert) must still give the right values."""
    x, idx, w, gate_up, down, factors = make_problem(11, 2, True, torch.float32, seed=5)
    want = naive_moe_lora(x, idx, w, gate_up, down, factors, 0.5)
    up_B = factors["w3.lora_B"]
    factors["w3.lora_B"] = up_B.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert factors["w3.lora_B"].stride() != factors["w1.lora_B"].stride()
    assert rel_err(run_triton(x, idx, w, gate_up, down, factors, 0.5), want) < TOL[torch.float32]


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


@pytest.mark.parametrize("kernel", ["small", "large"])
@pytest.mark.parametrize("T,k,num_experts,block_m", [(1, 8, 128, 16), (3, 2, 3, 4), (64, 8, 128, 16), (37, 3, 6, 16),
                                                     (300, 8, 128, 64), (700, 2, 6, 16)])
def test_routing_kernels_equal_torch_alignment(kernel, T, k, num_experts, block_m):
    """Both Triton alignments give the torch reference's result, order within an expert included
    (several chunks of ALIGN_CHUNK pairs at T = 300 and 700; experts left empty at E = 128)."""
    from peft_shared_moe.ops.block_routing import SMALL_PAIRS, _align_large, _align_small, _align_torch

    if kernel == "small" and T * k > SMALL_PAIRS:
        pytest.skip("the single-program kernel is for decode-sized batches")
    gen = torch.Generator().manual_seed(T)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(T)]).to(DEVICE)
    align = _align_small if kernel == "small" else _align_large
    fast, slow = align(idx, num_experts, block_m), _align_torch(idx, num_experts, block_m)
    assert torch.equal(fast.sorted_pair_ids, slow.sorted_pair_ids)
    assert torch.equal(fast.expert_of_block, slow.expert_of_block)
    assert torch.equal(fast.num_padded_rows, slow.num_padded_rows)


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


# --- backend="triton" is exact or refused; "auto" falls back -------------------------------------------

from peft_shared_moe.ops import ExpertsLayout, resolve_backend  # noqa: E402
from peft_shared_moe.ops import triton_experts  # noqa: E402
from peft_shared_moe.ops.triton_support import TritonBackendError  # noqa: E402
from tests.conftest import qwen3_moe_config, save_random_model  # noqa: E402

LAYOUT = ExpertsLayout(E, 32, 16)


def small_problem(dtype=torch.float32, shared: bool = True, device: str = DEVICE):
    x, idx, w, gate_up, down, factors = make_problem(5, 2, shared, dtype, seed=3)
    x, idx, w, gate_up, down = (t.to(device) for t in (x, idx, w, gate_up, down))
    return x, idx, w, gate_up, down, as_lora({f: t.to(device) for f, t in factors.items()}, 0.5)


@pytest.fixture
def auto_on_cpu(monkeypatch) -> list:
    """Let "auto" pick the kernels for CPU tensors too (they run in the interpreter), and record each
    time it does: so the CPU suite can tell a fallback from a kernel call."""
    calls: list = []
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_experts, "AUTO_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setitem(EXPERTS_BACKENDS, "triton", lambda *a, **k: calls.append(1) or triton_forward(*a, **k))
    return calls


@pytest.mark.parametrize("needs_grad", ["gate_up_proj", "down_proj"])
def test_triton_refuses_a_base_that_needs_gradients_and_auto_falls_back(needs_grad, auto_on_cpu):
    x, idx, w, gate_up, down, lora = small_problem()
    named = {"gate_up_proj": gate_up, "down_proj": down}
    named[needs_grad].requires_grad_(True)
    args = (x, idx, w, gate_up, down, F.silu)
    with pytest.raises(TritonBackendError, match=f"base weights \\({needs_grad} require grad\\).*frozen base only"):
        triton_forward(*args, lora=lora)
    with pytest.raises(TritonBackendError, match="frozen base only"):
        resolve_backend("triton", x, w, LAYOUT, lora, (gate_up, down))
    out = resolve_backend("auto", x, w, LAYOUT, lora, (gate_up, down))(*args, lora=lora)
    assert auto_on_cpu == []  # the torch path ran, with autograd
    assert out.requires_grad
    with torch.no_grad():  # inference of the same tensors is what the kernels are for
        assert rel_err(triton_forward(*args, lora=lora), out.detach()) < TOL[torch.float32]
        resolve_backend("auto", x, w, LAYOUT, lora, (gate_up, down))(*args, lora=lora)
    assert auto_on_cpu == [1]


def test_triton_refuses_autograd_without_an_adapter(auto_on_cpu):
    x, idx, w, gate_up, down, _ = small_problem()
    x.requires_grad_(True)
    with pytest.raises(TritonBackendError, match="trains an adapter, none is given"):
        triton_forward(x, idx, w, gate_up, down, F.silu)
    assert resolve_backend("auto", x, w, LAYOUT, None, (gate_up, down)) is EXPERTS_BACKENDS["torch"]


def test_triton_refuses_other_gates_and_layouts(auto_on_cpu):
    x, idx, w, gate_up, down, lora = small_problem()
    with torch.no_grad():
        with pytest.raises(TritonBackendError, match="SiLU"):
            triton_forward(x, idx, w, gate_up, down, F.gelu, lora=lora)
        for layout in [ExpertsLayout(E, 32, 16, silu_gate=False), ExpertsLayout(E, 32, 16, has_bias=True)]:
            with pytest.raises(TritonBackendError, match="SiLU gate"):
                resolve_backend("triton", x, w, layout, lora, (gate_up, down))
            assert resolve_backend("auto", x, w, layout, lora, (gate_up, down)) is EXPERTS_BACKENDS["torch"]


def test_triton_layer_with_gelu_experts_is_refused_and_auto_is_exact(tmp_path, auto_on_cpu):
    """A real GELU model: backend="triton" raises (it computed SiLU before), "auto" gives the torch path's values."""
    path = save_random_model(qwen3_moe_config(hidden_act="gelu"), tmp_path, seed=5)
    model = get_peft_model(load(path, device_map=DEVICE), SharedMoeLoraConfig(r=4, backend="triton"))
    randomize_adapter(model, seed=5)
    ids = input_ids().to(DEVICE)
    with torch.no_grad(), pytest.raises(TritonBackendError, match="SiLU"):
        model(input_ids=ids)
    layers = [m for m in model.modules() if isinstance(m, ExpertsLoraLayer)]
    with torch.no_grad():
        logits = {}
        for backend in ["auto", "torch"]:
            for layer in layers:
                layer.backend["default"] = backend
            logits[backend] = model(input_ids=ids).logits
    assert auto_on_cpu == []
    assert torch.equal(logits["auto"], logits["torch"])


def test_triton_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(triton_experts, "interpreter_active", lambda: False)
    x, idx, w, gate_up, down, lora = small_problem(device="cpu")
    with torch.no_grad():
        with pytest.raises(TritonBackendError, match="need a CUDA device"):
            triton_forward(x, idx, w, gate_up, down, F.silu, lora=lora)
        with pytest.raises(TritonBackendError, match="need a CUDA device"):
            resolve_backend("triton", x, w, LAYOUT, lora, (gate_up, down))
        assert resolve_backend("auto", x, w, LAYOUT, lora, (gate_up, down)) is EXPERTS_BACKENDS["torch"]


def test_triton_refuses_dtypes_the_torch_path_computes_differently():
    x, idx, w, gate_up, down, lora = small_problem(torch.float16)
    with torch.no_grad():
        with pytest.raises(TritonBackendError, match="base weights"):  # the torch path computes in float32 here
            triton_forward(x, idx, w, gate_up.float(), down.float(), F.silu, lora=lora)
        with pytest.raises(TritonBackendError, match="float64"):
            triton_forward(x.double(), idx, w.double(), gate_up.double(), down.double(), F.silu, lora=lora)


def test_triton_refuses_when_triton_is_missing(monkeypatch):
    import sys

    monkeypatch.delitem(EXPERTS_BACKENDS, "triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    x, idx, w, gate_up, down, lora = small_problem()
    with pytest.raises(TritonBackendError, match="triton does not import.*install triton"):
        resolve_backend("triton", x, w, LAYOUT, lora, (gate_up, down))
    assert resolve_backend("auto", x, w, LAYOUT, lora, (gate_up, down)) is EXPERTS_BACKENDS["torch"]


def test_triton_and_auto_train_every_factor_of_a_layer_as_the_torch_path(qwen3_path, auto_on_cpu):
    """On an H100 the inference kernels in training once gave a gradient to w2.lora_B only: training
    now runs the training kernels ("triton", and "auto" where they run), with the torch path's
    gradient for each of the six factors of every layer."""
    model = get_peft_model(load(qwen3_path, device_map=DEVICE), SharedMoeLoraConfig(r=4, backend="triton"))
    randomize_adapter(model, seed=7)
    ids = input_ids().to(DEVICE)
    grads = {}
    for backend in ["triton", "auto", "torch"]:
        for layer in model.modules():
            if isinstance(layer, ExpertsLoraLayer):
                layer.backend["default"] = backend
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if "experts.w" in n and ".lora_" in n}
    assert len(auto_on_cpu) == 4  # "triton" and "auto" each ran the kernels in both MoE layers
    assert len(grads["torch"]) == 2 * 6
    for backend in ["triton", "auto"]:
        for name, g in grads["torch"].items():
            assert g.abs().sum() > 0 and rel_err(grads[backend][name], g) < 1e-5, (backend, name)


def test_transformers_experts_implementation_is_exact_in_inference_and_training(qwen3_path, tmp_path, auto_on_cpu):
    """`experts_implementation="peft_shared_moe"` ("auto"): kernels for inference, the torch path with
    gradients in training, the torch path for a GELU gate; each against transformers' eager experts."""
    ids = input_ids()
    ours = load(qwen3_path, experts_implementation="peft_shared_moe", device_map=DEVICE)
    eager = load(qwen3_path, experts_implementation="eager")
    with torch.no_grad():
        got, want = ours(input_ids=ids.to(DEVICE)).logits.cpu(), eager(input_ids=ids).logits
    assert len(auto_on_cpu) == 2  # both MoE layers ran the kernels
    assert rel_err(got, want) < TOL[torch.float32]

    del auto_on_cpu[:]
    ours(input_ids=ids.to(DEVICE), labels=ids.to(DEVICE)).loss.backward()
    eager(input_ids=ids, labels=ids).loss.backward()
    assert auto_on_cpu == []
    for (name, p), (_, q) in zip(ours.named_parameters(), eager.named_parameters()):
        if "experts" in name:
            assert rel_err(p.grad.cpu(), q.grad) < 1e-5, name

    path = save_random_model(qwen3_moe_config(hidden_act="gelu"), tmp_path, seed=6)
    with torch.no_grad():
        got = load(path, experts_implementation="peft_shared_moe", device_map=DEVICE)(input_ids=ids.to(DEVICE)).logits
        want = load(path, experts_implementation="eager")(input_ids=ids).logits
    assert auto_on_cpu == []
    assert rel_err(got.cpu(), want) < 1e-5


# --- float32 follows torch's matmul precision ------------------------------------------------------------


@pytest.fixture
def restore_matmul_precision():
    old = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(old)


@pytest.fixture
def kernel_precisions(monkeypatch) -> list:
    """The DOT_PRECISION of every grouped-GEMM launch (the interpreter ignores it, so look at the launches)."""
    seen: list = []
    kernel = triton_experts._grouped_gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["DOT_PRECISION"])
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_experts, "_grouped_gemm_kernel", Spy())
    return seen


@pytest.mark.parametrize("shared", [True, False])
def test_float32_dots_follow_torch_matmul_precision(shared, restore_matmul_precision, kernel_precisions):
    x, idx, w, gate_up, down, lora = small_problem(shared=shared)
    for setting, want in [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32"), ("highest", "ieee")]:
        torch.set_float32_matmul_precision(setting)
        assert triton_experts.dot_precision(torch.float32) == want
        del kernel_precisions[:]
        with torch.no_grad():
            triton_forward(x, idx, w, gate_up, down, F.silu, lora=lora)
        assert kernel_precisions and set(kernel_precisions) == {want}, setting
    # 16-bit operands: triton's default, the kernel they always compiled to
    assert triton_experts.dot_precision(torch.float16) == triton_experts.dot_precision(torch.bfloat16) == "tf32"


# --- the custom op (what torch.compile sees) ------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_custom_op_passes_opcheck_and_matches_float64_reference(shared):
    """torch.library.opcheck checks the schema, fake (meta) implementation and dispatch of the
    op; its values are checked against the independent float64 loop, with and without an adapter."""
    from peft_shared_moe.ops.triton_experts import pack_lora

    x, idx, w, gate_up, down, factors = make_problem(6, 2, shared, torch.float32, seed=8)
    lora = as_lora(factors, 0.5)
    p = pack_lora(lora, x.dtype)
    cases = {
        "lora": ((p.gate_up_A, p.gate_B, p.up_B, p.down_A, p.down_B, 0.5), factors),
        "base": ((None, None, None, None, None, 0.0), None),
    }
    for name, (lora_args, ref_factors) in cases.items():
        args = tuple(t.to(DEVICE) for t in (x, idx, w, gate_up, down)) + tuple(
            t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in lora_args
        )
        torch.library.opcheck(torch.ops.peft_shared_moe.fused_experts.default, args)
        got = torch.ops.peft_shared_moe.fused_experts(*args).cpu()
        assert rel_err(got, naive_moe_lora(x, idx, w, gate_up, down, ref_factors, 0.5)) < TOL[torch.float32], name


# --- packed factors are never stale ----------------------------------------------------------------------


class TritonLayer:
    """One experts layer of a tiny Qwen3-MoE with backend="triton", and fixed inputs for it."""

    def __init__(self, model) -> None:
        self.model = model
        self.layer = next(m for m in model.modules() if isinstance(m, ExpertsLoraLayer))
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(9, 32, generator=gen).to(DEVICE)
        self.idx = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(9)]).to(DEVICE)
        self.w = torch.rand(9, 2, generator=gen).to(DEVICE)

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Triton, torch path) of the layer now, under no_grad."""
        name = self.layer.active_adapters[0]
        with torch.no_grad():
            got = self.layer(self.x, self.idx, self.w)
            self.layer.backend[name] = "torch"
            want = self.layer(self.x, self.idx, self.w)
            self.layer.backend[name] = "triton"
        return got, want

    def assert_current(self, before: torch.Tensor) -> torch.Tensor:
        """The kernels compute from the factors as they are now: equal to the torch path, unlike `before`."""
        got, want = self.outputs()
        assert rel_err(got, want) < TOL[torch.float32]
        assert rel_err(got, before) > 1e-3  # the update changed the output, so a stale pack would show
        return got


@pytest.fixture
def triton_layer(qwen3_path) -> TritonLayer:
    model = get_peft_model(load(qwen3_path, device_map=DEVICE), SharedMoeLoraConfig(r=4, backend="triton"))
    randomize_adapter(model, seed=1)
    return TritonLayer(model)


@pytest.mark.parametrize("factor", ["w1.lora_A", "w1.lora_B", "w3.lora_A", "w3.lora_B", "w2.lora_A", "w2.lora_B"])
def test_pack_follows_in_place_edits_through_data(triton_layer, factor):
    """`.data` edits bump no version counter: the old cache keyed on versions served stale factors."""
    before, _ = triton_layer.outputs()
    param = triton_layer.layer.factor_params("default")[factor]
    version = param._version
    param.data.mul_(-2.0)
    assert param._version == version
    triton_layer.assert_current(before)


def test_pack_follows_load_state_dict_and_set_peft_model_state_dict(triton_layer, qwen3_path):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    other = get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4))
    randomize_adapter(other, seed=2)
    before, _ = triton_layer.outputs()
    triton_layer.model.load_state_dict(other.state_dict())
    after = triton_layer.assert_current(before)
    randomize_adapter(other, seed=3)
    set_peft_model_state_dict(triton_layer.model, get_peft_model_state_dict(other))
    triton_layer.assert_current(after)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
def test_pack_follows_optimizer_steps(triton_layer, optimizer):
    model = triton_layer.model
    before, _ = triton_layer.outputs()
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = input_ids().to(DEVICE)
    layers = [m for m in model.modules() if isinstance(m, ExpertsLoraLayer)]
    for each in layers:  # training runs the torch path (backend="auto" would pick it)
        each.backend["default"] = "torch"
    model(input_ids=ids, labels=ids).loss.backward()
    for each in layers:
        each.backend["default"] = "triton"
    opt.step()
    triton_layer.assert_current(before)


def test_pack_follows_merge_and_unmerge(triton_layer):
    model, layer = triton_layer.model, triton_layer.layer
    before, _ = triton_layer.outputs()
    model.merge_adapter()
    with torch.no_grad():  # merged: the base experts alone, holding W + s B A
        merged = layer(triton_layer.x, triton_layer.idx, triton_layer.w)
    model.unmerge_adapter()
    got, want = triton_layer.outputs()
    assert rel_err(got, want) < TOL[torch.float32]
    assert rel_err(merged, before) < 1e-5 and rel_err(got, before) < 1e-5
    layer.factor_params("default")["w2.lora_B"].data.mul_(3.0)  # and a later edit still shows
    triton_layer.assert_current(before)
