"""The Triton training kernels (ops/triton_train.py; the interpreter on CPU, the GPU where there is
one): values and every gradient against autograd through the naive float64 loop, over both layouts
and their mixes, T = 1 and experts without tokens; gradients of the factors alone; inside a model with
gradient checkpointing and two active adapters, against the torch path; the custom ops' registration
(opcheck) and torch.compile without graph breaks; bf16 on the GPU within the torch path's noise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_shared_moe import SharedMoeLoraConfig
from peft_shared_moe.ops import EXPERTS_BACKENDS, ExpertsLayout
from peft_shared_moe.ops.triton_train import _FACTORS, experts_lora_train_forward
from peft_shared_moe.tuners import ExpertsLoraLayer
from tests.conftest import input_ids, load, randomize_adapter
from tests.reference import naive_moe_lora
from tests.test_ops import E, H, I, as_lora, make_problem, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUT = ExpertsLayout(E, H, I)
TOL = {torch.float32: 1e-5, torch.float16: 2e-2}


def problem(T, k, shared_in, shared_out, dtype, seed, experts_used=E):
    """make_problem's tensors, with the input and output factors shared or per expert independently."""
    x, idx, w, gate_up, down, factors = make_problem(T, k, shared_in, torch.float64, seed, experts_used)
    other = make_problem(T, k, shared_out, torch.float64, seed + 100, experts_used)[5]
    factors["w2.lora_B"] = other["w2.lora_B"]
    return x, idx, w, gate_up, down, factors


def values_and_grads(x, idx, w, gate_up, down, factors, dtype, fn, leaves=("x", "w", *_FACTORS)):
    """fn's output and the gradients of `leaves` for one probe, the tensors cast to dtype on DEVICE."""
    named = {"x": x, "w": w, **factors}
    cast = {n: t.to(dtype=dtype, device=DEVICE if fn is not None else "cpu").detach() for n, t in named.items()}
    for n in leaves:
        cast[n].requires_grad_(True)
    lora = {f: cast[f] for f in _FACTORS}
    if fn is None:
        out = naive_moe_lora(cast["x"], idx, cast["w"], gate_up, down, lora, 0.6)
    else:
        out = fn(cast["x"], idx.to(DEVICE), cast["w"], gate_up.to(DEVICE, dtype), down.to(DEVICE, dtype), F.silu,
                 lora=as_lora(lora, 0.6), layout=LAYOUT)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = torch.autograd.grad(out, [cast[n] for n in leaves], probe.to(out.device, out.dtype))
    return [out.detach().cpu()] + [g.cpu() for g in grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared_in,shared_out", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("T,k,experts_used", [(1, 2, E), (9, 2, 3), (37, 3, E)])  # T = 1, empty experts, T % block
def test_values_and_gradients_match_the_naive_loop(dtype, shared_in, shared_out, T, k, experts_used):
    tensors = problem(T, k, shared_in, shared_out, dtype, seed=T + k, experts_used=experts_used)
    got = values_and_grads(*tensors, dtype, EXPERTS_BACKENDS["triton"])
    want = values_and_grads(*tensors, torch.float64, None)
    for name, a, b in zip(["y", "x", "w", *_FACTORS], got, want):
        assert rel_err(a, b) < TOL[dtype], name


def test_factor_gradients_alone():
    """Neither the input nor the routing weights need a gradient (the input's GEMM is skipped)."""
    tensors = problem(11, 2, True, True, torch.float32, seed=4)
    got = values_and_grads(*tensors, torch.float32, EXPERTS_BACKENDS["triton"], leaves=_FACTORS)
    want = values_and_grads(*tensors, torch.float64, None, leaves=_FACTORS)
    for name, a, b in zip(["y", *_FACTORS], got, want):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("variant", ["checkpointing", "two_adapters"])
def test_in_a_model_equals_the_torch_path(qwen3_path, variant):
    model = load(qwen3_path, device_map=DEVICE)
    if variant == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, SharedMoeLoraConfig(r=4, backend="triton", shared_outer=True))
    if variant == "two_adapters":
        model.add_adapter("other", SharedMoeLoraConfig(r=6, backend="triton", shared_outer=False))
        model.base_model.set_adapter(["default", "other"])
    randomize_adapter(model, seed=11)
    randomize_adapter(model, "other", seed=12)
    ids = input_ids().to(DEVICE)
    results = {}
    for backend in ["triton", "torch"]:
        for layer in model.modules():
            if isinstance(layer, ExpertsLoraLayer):
                layer.backend = {name: backend for name in layer.backend}
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (loss.detach(), grads)
    assert rel_err(results["triton"][0], results["torch"][0]) < 1e-6
    expert_grads = [n for n in results["torch"][1] if "experts.w" in n]
    assert len(expert_grads) == 2 * 6 * (2 if variant == "two_adapters" else 1)
    for name in expert_grads:
        assert results["torch"][1][name].abs().sum() > 0, name
    for name, g in results["torch"][1].items():
        assert torch.equal(g, results["triton"][1][name]) or rel_err(results["triton"][1][name], g) < 1e-5, name


def _op_args(shared: bool, dtype=torch.float32):
    x, idx, w, gate_up, down, factors = problem(7, 2, shared, shared, dtype, seed=5)
    named = [x, idx, w, gate_up, down, *(factors[f] for f in _FACTORS)]
    args = [t.to(DEVICE, dtype if t.is_floating_point() else t.dtype) for t in named]
    for t in args:
        if t.is_floating_point() and t is not args[3] and t is not args[4]:
            t.requires_grad_(True)
    return (*args, 0.6)


@pytest.mark.parametrize("shared", [True, False])
def test_custom_op_registration(shared):
    """Schema, fake (meta) shapes, autograd registration and no aliasing, as torch.library checks them."""
    torch.library.opcheck(experts_lora_train_forward, _op_args(shared),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiles_without_graph_breaks():
    """A layer's forward and backward in one graph (fullgraph raises on a break)."""
    x, idx, w, gate_up, down, *factors, scaling = _op_args(True)
    lora = as_lora(dict(zip(_FACTORS, factors)), scaling)
    fn = EXPERTS_BACKENDS["triton"]

    def layer(x, w):
        return fn(x, idx, w, gate_up, down, F.silu, lora=lora, layout=LAYOUT)

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # the CPU has the interpreter, not inductor's triton
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(x, w).square().sum(), [x, w, *factors])
    want = torch.autograd.grad(layer(x, w).square().sum(), [x, w, *factors])
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 kernels need a GPU (the interpreter has no bf16)")
@pytest.mark.parametrize("shared", [True, False])
def test_bfloat16_gradients_within_the_torch_paths_noise(shared):
    """bf16 base and activations with float32 factors (get_peft_model's layout): every gradient's error
    against float64 is at most about the torch path's own (transformers' grouped_mm, bf16)."""
    tensors = problem(512, 4, shared, shared, torch.float64, seed=12)
    want = values_and_grads(*tensors, torch.float64, None)

    def bf16_base(fn):
        def call(x, idx, w, gate_up, down, act, lora, layout):  # float32 leaves, cast where the model casts
            return fn(x.bfloat16(), idx, w.bfloat16(), gate_up.bfloat16(), down.bfloat16(), act, lora=lora, layout=layout)
        return call

    errs = {}
    for backend in ["triton", "torch"]:
        got = values_and_grads(*tensors, torch.float32, bf16_base(EXPERTS_BACKENDS[backend]))
        errs[backend] = [rel_err(a, b) for a, b in zip(got, want)]
    for name, ours, theirs in zip(["y", "x", "w", *_FACTORS], errs["triton"], errs["torch"]):
        assert ours < 2 * theirs + 1e-3, (name, ours, theirs)


def test_every_tile_config_in_the_files_is_complete():
    """Each card and shape of configs/train_experts.json gives every training kernel a tile with the
    shared block_m; each card and shape of fused_moe.json a table per kernel; "default" cards and
    shapes exist in both."""
    import json

    from peft_shared_moe.ops import kernel_configs as kc

    train = json.loads(kc.TRAIN_CONFIG_FILE.read_text())
    assert "default" in train["default"]
    for card, shapes in train.items():
        assert "default" in shapes, card
        for key, entry in shapes.items():
            configs = kc.parse_train_configs(entry)
            assert configs.block_m in (16, 32, 64, 128, 256), (card, key)
            assert all(getattr(configs, k).block_m == configs.block_m for k in kc.TRAIN_KERNELS), (card, key)
    inference = json.loads(kc.CONFIG_FILE.read_text())
    assert "default" in inference
    for card, shapes in inference.items():
        assert "default" in shapes, card
        for key, kernels in shapes.items():
            assert set(kernels) == {"gate_up", "down"}, (card, key)
            for table in kernels.values():
                assert [kc.KernelConfig(**cfg) for cfg in table.values()], (card, key)


def test_inference_tiles_by_card_shape_and_token_count(monkeypatch):
    """The largest tuned token count <= T of the card's shape; another shape the card's default."""
    from peft_shared_moe.ops import kernel_configs as kc

    tile = lambda block_m: {"block_m": block_m, "block_n": 32, "block_k": 32}  # noqa: E731
    data = {"default": {"default": {"gate_up": {"1": tile(16)}, "down": {"1": tile(16)}}},
            "Card X": {"E=8,H=64,I=32": {"gate_up": {"1": tile(16), "64": tile(64)}, "down": {"1": tile(16)}},
                       "default": {"gate_up": {"1": tile(32)}, "down": {"1": tile(32)}}}}
    monkeypatch.setattr(kc, "_file", lambda path: data)
    monkeypatch.setattr(kc, "_device_card", lambda device: "Card X")
    kc._table.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        assert kc.kernel_config("gate_up", 63, cuda, kc.shape_key(8, 64, 32)).block_m == 16
        assert kc.kernel_config("gate_up", 64, cuda, kc.shape_key(8, 64, 32)).block_m == 64
        assert kc.kernel_config("gate_up", 4096, cuda, kc.shape_key(8, 64, 48)).block_m == 32
    finally:
        kc._table.cache_clear()


def test_training_tiles_by_card_and_shape(monkeypatch):
    """A tuned shape gets its own entry; another shape the card's default; an unknown card the
    file's default, with a warning naming the card."""
    from peft_shared_moe.ops import kernel_configs as kc

    tile = {"block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 2}
    entry = lambda block_m: {"block_m": block_m, **{k: tile for k in kc.TRAIN_KERNELS}}  # noqa: E731
    data = {"default": {"default": entry(16)}, "Card X": {"E=8,H=64,I=32": entry(64), "default": entry(32)}}
    monkeypatch.setattr(kc, "_file", lambda path: data)
    kc._train_configs.cache_clear()
    kc._warn_untuned.cache_clear()
    try:
        assert kc._train_configs("Card X", kc.shape_key(8, 64, 32)).block_m == 64
        assert kc._train_configs("Card X", kc.shape_key(8, 64, 48)).block_m == 32
        with pytest.warns(UserWarning, match="Card Y"):
            assert kc._train_configs("Card Y", kc.shape_key(8, 64, 32)).block_m == 16
    finally:
        kc._train_configs.cache_clear()
        kc._warn_untuned.cache_clear()


def test_a_short_finetune_follows_the_torch_path(qwen3_path):
    """Twelve SGD steps on one batch from the same start: every loss and the trained factors of the
    Triton training path equal the torch path's (float32, to 1e-4 and 1e-3), and the loss falls."""
    runs = {}
    for backend in ["triton", "torch"]:
        torch.manual_seed(0)
        model = get_peft_model(load(qwen3_path, device_map=DEVICE), SharedMoeLoraConfig(r=4, backend=backend))
        randomize_adapter(model, seed=21, scale=0.1)
        # SGD: Adam's normalisation turns float32 rounding in a near-zero gradient into a full step
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=20.0)
        ids = input_ids(batch=4, length=12).to(DEVICE)
        losses = []
        for _ in range(12):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs[backend] = (losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    (losses, factors), (want_losses, want_factors) = runs["triton"], runs["torch"]
    assert want_losses[-1] < 0.97 * want_losses[0]
    for got, want in zip(losses, want_losses):
        assert abs(got - want) < 1e-4 * abs(want)
    for name, p in want_factors.items():  # float32 rounding, grown by twelve large steps
        assert rel_err(factors[name], p) < 1e-3, name


@pytest.mark.parametrize("backend", ["torch", "loop", "torch_fused", "triton"])
def test_an_empty_batch(backend):
    """No token at all (T = 0): an empty output and zero gradients, on every backend, in training."""
    x, idx, w, gate_up, down, factors = problem(3, 2, True, True, torch.float32, seed=6)
    f32 = dict(device=DEVICE, dtype=torch.float32)
    x, idx, w = x[:0].to(**f32).requires_grad_(True), idx[:0].to(DEVICE), w[:0].to(**f32)
    lora = {f: t.to(**f32).requires_grad_(True) for f, t in factors.items()}
    out = EXPERTS_BACKENDS[backend](x, idx, w, gate_up.to(**f32), down.to(**f32), F.silu,
                                    lora=as_lora(lora, 0.6), layout=LAYOUT)
    assert out.shape == (0, H)
    grads = torch.autograd.grad(out.sum(), [x, *lora.values()], allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
