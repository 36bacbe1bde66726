"""Quantized weight formats (ops/quantized.py): NF4 and block-wise FP8 round trips against known
values, the bitsandbytes nibble order, error bounds on random weights, and the sizes refused."""

from __future__ import annotations

import pytest
import torch

from peft_shared_moe.ops.quantized import (
    FP8_MAX, NF4_LEVELS, Fp8BlockWeight, QuantizationError, dequantize_fp8_blockwise, dequantize_nf4, quantize_fp8_blockwise,
    quantize_nf4,
)


def test_nf4_levels_round_trip_exactly_and_pack_high_nibble_first():
    levels = torch.tensor(NF4_LEVELS)
    scale = torch.tensor([2.5, 0.125])
    weight = torch.cat([levels * scale[0], levels.flip(0) * scale[1]]).reshape(4, 8)  # two blocks of 16
    q = quantize_nf4(weight, block=16)
    assert torch.equal(q.absmax, scale)
    assert torch.equal(dequantize_nf4(q), weight)
    # first block: indices 0, 1, ... 15 -> bytes 0x01, 0x23, ...; second block: 15, 14, ... -> 0xFE, ...
    assert q.packed[:2].tolist() == [0x01, 0x23]
    assert q.packed[8:10].tolist() == [0xFE, 0xDC]


def test_nf4_picks_the_nearest_level_of_random_weights():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 32, 64, generator=gen, dtype=torch.float64)
    q = quantize_nf4(weight)
    got = dequantize_nf4(q, torch.float64)
    blocks = weight.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    nearest = levels[((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(-1)] * absmax
    assert torch.allclose(got.reshape(-1, 64), nearest, rtol=1e-6, atol=1e-7)
    assert got.shape == weight.shape and got.dtype == torch.float64


def test_fp8_blockwise_round_trips_representable_values_exactly():
    gen = torch.Generator().manual_seed(1)
    # values on the e4m3 grid (3 mantissa bits) scaled per 2x4 block, with the block's maximum at 448
    mantissa = torch.randint(8, 16, (2, 4, 8), generator=gen).double() / 8
    exponent = torch.randint(-4, 5, (2, 4, 8), generator=gen).double()
    grid = mantissa * 2.0 ** exponent
    for row, col in ((0, 0), (0, 4), (2, 0), (2, 4)):  # each block's maximum
        grid[:, row, col] = FP8_MAX
    scale = torch.tensor([[[0.5, 3.0], [0.25, 1.0]], [[2.0, 0.125], [1.5, 4.0]]], dtype=torch.float64)
    weight = grid * scale.repeat_interleave(2, 1).repeat_interleave(4, 2)
    q = quantize_fp8_blockwise(weight, block=(2, 4))
    assert q.weight.dtype == torch.float8_e4m3fn
    assert torch.allclose(q.scale_inv.double(), scale)
    assert torch.equal(dequantize_fp8_blockwise(q, torch.float64), weight)


def test_fp8_blockwise_error_of_random_weights():
    weight = torch.randn(3, 256, 384, generator=torch.Generator().manual_seed(2))
    q = quantize_fp8_blockwise(weight)
    assert q.scale_inv.shape == (3, 2, 3)
    err = (dequantize_fp8_blockwise(q) - weight).abs()
    assert (err <= weight.abs() / 16 + 2 ** -9 * q.scale_inv.max()).all()  # e4m3: 3 mantissa bits


def test_sizes_that_do_not_divide_are_refused_naming_them():
    with pytest.raises(QuantizationError, match=r"NF4 block size 64 must be even and divide the weight's 96 values"):
        quantize_nf4(torch.randn(3, 32))
    with pytest.raises(QuantizationError, match=r"FP8 block \(128, 128\) must divide the weight's last two dims \(128, 200\)"):
        quantize_fp8_blockwise(torch.randn(2, 128, 200))
    q = quantize_fp8_blockwise(torch.randn(128, 256))
    bad = type(q)(q.weight, q.scale_inv[:, :1], q.block)
    with pytest.raises(QuantizationError, match=r"needs scale_inv of shape \(1, 2\)"):
        dequantize_fp8_blockwise(bad)


# ---- a quantized base under the adapter (quantize_experts, the torch path) ------------------------

SCHEME_ARGS = [("nf4", None), ("fp8", (16, 16))]  # the test model's dims are 32 and 16: FP8 blocks of 16
STORAGE = {"nf4": ("packed", "absmax"), "fp8": ("weight", "scale_inv")}


def quantized_and_reference(path, scheme, block):
    """The test model with its experts quantized (float32 compute), and the same model in float64 whose
    expert weights are the dequantized values: what the quantized base must compute."""
    from peft_shared_moe import quantize_experts
    from peft_shared_moe.ops import describe_experts
    from tests.conftest import load

    quantized = quantize_experts(load(path, dtype=torch.float32), scheme, block)
    reference = load(path, dtype=torch.float64, experts_implementation="eager")
    pairs = zip([m for m in quantized.modules() if describe_experts(m) is not None],
                [m for m in reference.modules() if describe_experts(m) is not None])
    with torch.no_grad():
        for q, r in pairs:
            r.gate_up_proj.copy_(q.gate_up_proj.dequantize())
            r.down_proj.copy_(q.down_proj.dequantize())
    return quantized, reference


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("scheme,block", SCHEME_ARGS)
def test_adapter_on_a_quantized_base_equals_float64_on_the_dequantized_weights(qwen3_path, scheme, block):
    """Logits, the input's gradient and every factor's gradient, with a shared-outer adapter on
    experts and attention: exact up to accumulation order."""
    from peft import get_peft_model

    from peft_shared_moe import SharedMoeLoraConfig
    from tests.conftest import input_ids, randomize_adapter

    quantized, reference = quantized_and_reference(qwen3_path, scheme, block)
    keys = list(quantized.state_dict())
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)  # the float weight is gone
    assert all(any(k.endswith(f"experts.gate_up_proj.{b}") for k in keys) for b in STORAGE[scheme])
    ids = input_ids()
    with torch.no_grad():
        assert rel(quantized(input_ids=ids).logits, reference(input_ids=ids).logits) < 1e-5  # the base alone
    config = dict(r=4, target_modules=["experts", "q_proj", "v_proj"], backend="auto")
    models = [get_peft_model(m, SharedMoeLoraConfig(**config)) for m in (quantized, reference)]
    grads = []
    for model in models:
        randomize_adapter(model, seed=3)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds).logits
        probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (logits * probe.to(logits.dtype)).sum().backward()
        factors = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
        grads.append((logits.detach(), embeds.grad, factors))
    (got, got_dx, got_f), (want, want_dx, want_f) = grads
    assert rel(got, want) < 1e-5 and rel(got_dx, want_dx) < 1e-5
    assert set(got_f) == set(want_f) and any("experts" in n for n in got_f)
    for name in want_f:
        assert rel(got_f[name], want_f[name]) < 1e-5, name


def test_train_save_and_load_onto_the_unquantized_base(qwen3_path, tmp_path):
    """A few SGD steps on a 4-bit base; the saved adapter loads onto the float base unchanged, and
    generate runs on the quantized one."""
    from peft import PeftModel, get_peft_model

    from peft_shared_moe import SharedMoeLoraConfig
    from tests.conftest import input_ids, load

    model, _ = quantized_and_reference(qwen3_path, "nf4", None)
    model = get_peft_model(model, SharedMoeLoraConfig(r=4, init_lora_weights=False))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = input_ids(batch=2, length=8)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load(qwen3_path, dtype=torch.float32), tmp_path)
    saved = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, saved[name]), name
    out = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


def test_merge_onto_a_quantized_base_is_refused_and_changes_nothing(qwen3_path):
    from peft import get_peft_model

    from peft_shared_moe import SharedMoeLoraConfig
    from tests.conftest import randomize_adapter

    model, _ = quantized_and_reference(qwen3_path, "nf4", None)
    model = get_peft_model(model, SharedMoeLoraConfig(r=4, target_modules=["q_proj", "experts"]))
    randomize_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"held quantized \(nf4\).*merge onto the bf16 base"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="held quantized"):
        model.merge_and_unload()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # q_proj included: no layer merged first


@pytest.mark.parametrize("scheme,block,inter,row_scales", [
    ("nf4", 64, 64, (True, True)), ("fp8", (16, 16), 64, (True, True)),  # one scale per row and K step
    ("nf4", 32, 64, (False, False)), ("fp8", (16, 8), 64, (False, False)),  # every element decoded
    ("nf4", 64, 80, (True, False)), ("fp8", (16, 16), 80, (True, True)),  # N tiles masked (I = 80)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["none", "shared", "per_expert"])
def test_kernels_on_a_quantized_base_equal_the_torch_path(scheme, block, inter, row_scales, dtype, layout, monkeypatch):
    """The Triton kernels dequantizing tiles in registers (the interpreter on CPU), against the naive
    float64 loop on the dequantized weights, with the tile path each launch took: NF4 blocks of 64 and
    FP8 blocks of 16 take the row-scale tiles (NF4 nibbles split in registers); NF4 blocks of 32
    (below the least NF4 step), FP8 blocks 8 wide in K and NF4 rows of 80 (not a multiple of the
    block) decode every element."""
    from peft_shared_moe.ops import EXPERTS_BACKENDS, ExpertLoraFactors, triton_quantized
    from tests.reference import naive_moe_lora

    launched = []
    real_launch = triton_quantized.launch_fitting
    monkeypatch.setattr(triton_quantized, "launch_fitting",
                        lambda *a, **meta: launched.append(meta["ROW_SCALES"]) or real_launch(*a, **meta))
    device, gate_up, down, x, idx, w, factors = quantized_layer(scheme, block, dtype, H=64, I=inter, layout=layout)
    want = naive_moe_lora(x, idx, w, gate_up.dequantize().double().cpu(), down.dequantize().double().cpu(), factors, 0.7)
    lora = None if factors is None else ExpertLoraFactors({f: t.float().to(device) for f, t in factors.items()}, 0.7)
    with torch.no_grad():
        got = EXPERTS_BACKENDS["triton"](x.to(device, dtype), idx.to(device), w.to(device, dtype), gate_up, down, None,
                                         lora=lora)
    assert rel(got.cpu(), want) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert tuple(launched) == row_scales  # (gate_up, down)


def quantized_layer(scheme, block, dtype=torch.float32, seed=7, E=5, H=32, I=48, T=13, k=2, r=4, layout="shared"):
    """A random quantized experts layer, routing, and float64 adapter factors (None for layout "none")."""
    from peft_shared_moe.ops.quantized import SCHEMES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(seed)
    gate_up = SCHEMES[scheme](torch.randn(E, 2 * I, H, generator=gen) * 0.2, block, dtype=dtype).to(device)
    down = SCHEMES[scheme](torch.randn(E, H, I, generator=gen) * 0.2, block, dtype=dtype).to(device)
    x = torch.randn(T, H, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=gen), -1)
    factors = None
    if layout != "none":
        outer = 1 if layout == "shared" else E
        shapes = {"w1.lora_A": (outer, r, H), "w3.lora_A": (outer, r, H), "w1.lora_B": (E, I, r),
                  "w3.lora_B": (E, I, r), "w2.lora_A": (E, r, I), "w2.lora_B": (outer, H, r)}
        factors = {f: torch.randn(*s, generator=gen, dtype=torch.float64) * 0.3 for f, s in shapes.items()}
    return device, gate_up, down, x, idx, w, factors


@pytest.mark.parametrize("scheme,block", [("nf4", 16), ("fp8", (16, 16))])
@pytest.mark.parametrize("layout", ["shared", "per_expert"])
def test_training_kernels_on_a_quantized_base_equal_float64_autograd(scheme, block, layout):
    """backend="triton" under autograd on a quantized base (the interpreter on CPU): the output and the
    gradients of the input, the routing weights and all six factors against float64 autograd through
    the naive loop on the dequantized weights."""
    from peft_shared_moe.ops import EXPERTS_BACKENDS, ExpertLoraFactors
    from tests.reference import naive_moe_lora

    device, gate_up, down, x, idx, w, factors = quantized_layer(scheme, block, layout=layout)
    names = sorted(factors)
    ref = {f: t.clone().requires_grad_() for f, t in factors.items()}
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    want = naive_moe_lora(xd, idx, wd, gate_up.dequantize().double().cpu(), down.dequantize().double().cpu(), ref, 0.7)
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want_grads = torch.autograd.grad(want, [xd, wd, *(ref[f] for f in names)], probe)

    got_f = {f: t.float().to(device).requires_grad_() for f, t in factors.items()}
    xg, wg = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    got = EXPERTS_BACKENDS["triton"](xg, idx.to(device), wg, gate_up, down, None, lora=ExpertLoraFactors(got_f, 0.7))
    got_grads = torch.autograd.grad(got, [xg, wg, *(got_f[f] for f in names)], probe.float().to(device))
    assert rel(got.cpu(), want) < 1e-5
    for name, g, ref_g in zip(["x", "top_k_weights", *names], got_grads, want_grads):
        assert rel(g.cpu(), ref_g) < 1e-5, name


def test_the_training_dequantization_decodes_as_the_torch_path_and_keeps_no_dense_weight():
    """The transient buffer equals the reference dequantization (both schemes), and autograd's saved
    tensors hold nothing of a weight's size: the backward dequantizes again."""
    from peft_shared_moe.ops import EXPERTS_BACKENDS, ExpertLoraFactors
    from peft_shared_moe.ops.triton_quantized import dequantized

    for scheme, block in (("nf4", 16), ("fp8", (16, 16))):
        device, gate_up, down, x, idx, w, factors = quantized_layer(scheme, block)
        for weight in (gate_up, down):
            assert torch.equal(dequantized(weight, torch.float32), weight.dequantize())
    lora = ExpertLoraFactors({f: t.float().to(device).requires_grad_() for f, t in factors.items()}, 0.5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        EXPERTS_BACKENDS["triton"](x.to(device), idx.to(device), w.to(device), gate_up, down, None, lora=lora)
    assert saved and not any(len(s) == 3 and s[1:] in ((96, 32), (32, 48)) for s in saved), saved


def test_auto_runs_the_kernels_on_a_quantized_base_and_refuses_them_under_compile(qwen3_path, monkeypatch):
    from peft_shared_moe.ops import EXPERTS_BACKENDS, describe_experts, resolve_backend
    from peft_shared_moe.ops import triton_experts
    from peft_shared_moe.ops.triton_experts import triton_refusals

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = quantized_and_reference(qwen3_path, "fp8", (16, 16))
    experts = next(m for m in model.to(device).modules() if describe_experts(m) is not None)
    weights = (experts.gate_up_proj, experts.down_proj)
    x = torch.randn(3, 32, device=device, requires_grad=True)
    assert triton_refusals(x, weights) == ["autograd is needed and the kernels' backward trains an adapter, none is "
                                           "given: use backend='auto' or 'torch'"]
    assert triton_refusals(x.detach(), weights) == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for hidden in (x, x.detach()):
        assert any("the quantized kernels are eager only" in r for r in triton_refusals(hidden, weights))
    monkeypatch.undo()
    monkeypatch.setattr(triton_experts, "AUTO_DEVICE_TYPES", ("cuda", "cpu"))
    with torch.no_grad():
        chosen = resolve_backend("auto", x.detach(), torch.rand(3, 2, device=device), describe_experts(experts), None,
                                 weights)
    assert chosen.func is EXPERTS_BACKENDS["triton"]


def test_quantize_experts_refusals_change_nothing(qwen3_path):
    from peft_shared_moe import QuantizationError, quantize_experts
    from tests.conftest import load

    model = load(qwen3_path, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=r"scheme 'int3' is not supported; supported: \['fp8', 'nf4'\]"):
        quantize_experts(model, "int3")
    with pytest.raises(QuantizationError, match=r"gate_up_proj: FP8 block \(128, 128\) must divide the weight's last two dims \(32, 32\)"):
        quantize_experts(model, "fp8")
    with pytest.raises(QuantizationError, match=r"NF4 block size 48 must be even and divide one expert's 1024"):
        quantize_experts(model, "nf4", 48)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    quantize_experts(model, "nf4")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_experts(model, "nf4")


def test_moving_a_quantized_block_keeps_its_storage(qwen3_path):
    from peft_shared_moe.ops import describe_experts

    model, _ = quantized_and_reference(qwen3_path, "fp8", (16, 16))
    experts = next(m for m in model.modules() if describe_experts(m) is not None)
    values = experts.gate_up_proj.dequantize()
    model.to(torch.float64)
    weight = experts.gate_up_proj
    assert weight.weight.dtype == torch.float8_e4m3fn and weight.scale_inv.dtype == torch.float32
    assert weight.dtype == torch.float64  # the compute dtype follows the model
    assert torch.equal(weight.dequantize(), values.double())


def test_training_keeps_no_dequantized_weight():
    """The torch path's autograd saves nothing of the weight's size: the backward dequantizes again.
    Its input gradient equals float64 autograd through the dequantized weight."""
    from peft_shared_moe.ops.quantized import Nf4ExpertWeights

    gen = torch.Generator().manual_seed(3)
    weight = Nf4ExpertWeights(torch.randn(3, 24, 32, generator=gen), 32)
    x = torch.randn(10, 32, generator=gen, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = weight.grouped_linear(x, [4, 4, 10])
    assert not any(s[-2:] in ((24, 32), (32, 24)) for s in saved), saved
    probe = torch.randn(y.shape, generator=gen)
    (grad,) = torch.autograd.grad(y, x, probe)
    dense = weight.dequantize().double()
    xd = x.detach().double().requires_grad_()
    want = torch.cat([xd[:4] @ dense[0].T, xd[4:10] @ dense[2].T])
    (want_grad,) = torch.autograd.grad(want, xd, probe.double())
    assert rel(y, want) < 1e-6 and rel(grad, want_grad) < 1e-6


def test_experts_quantized_by_another_scheme_are_refused_naming_it(qwen3_path):
    """A block holding FineGrainedFP8 weights (float8 + *_scale_inv), as transformers loads an FP8
    checkpoint: get_peft_model refuses it instead of computing with unscaled values."""
    from peft import get_peft_model

    from peft_shared_moe import SharedMoeLoraConfig, UnsupportedExpertsError
    from peft_shared_moe.ops import describe_experts
    from tests.conftest import load

    model = load(qwen3_path, dtype=torch.float32)
    experts = next(m for m in model.modules() if describe_experts(m) is not None)
    for p in ("gate_up_proj", "down_proj"):
        q = quantize_fp8_blockwise(getattr(experts, p).detach(), (16, 16))
        setattr(experts, p, torch.nn.Parameter(q.weight, requires_grad=False))
        experts.register_parameter(f"{p}_scale_inv", torch.nn.Parameter(q.scale_inv, requires_grad=False))
    with pytest.raises(UnsupportedExpertsError, match=r"quantized by FineGrainedFP8 \(gate_up_proj torch.float8_e4m3fn"):
        get_peft_model(model, SharedMoeLoraConfig(r=4))


def test_quantizing_onto_a_device_moves_the_model(qwen3_path):
    """quantize_experts(..., device=) quantizes each block there and moves the rest of the model after;
    the result computes what quantizing in place computes (on the CPU-only CI the target is the CPU)."""
    from peft_shared_moe import quantize_experts
    from tests.conftest import input_ids, load

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = quantize_experts(load(qwen3_path, dtype=torch.float32), "nf4", device=device)
    b = quantize_experts(load(qwen3_path, dtype=torch.float32), "nf4")
    assert all(t.device.type == device for t in a.state_dict().values())
    with torch.no_grad():
        assert torch.allclose(a(input_ids=input_ids().to(device)).logits.cpu(), b(input_ids=input_ids()).logits,
                              rtol=1e-4, atol=1e-5)


def test_demo_fine_tune_on_a_4bit_base_reaches_the_float_base(tmp_path):
    """examples/train_demo.py, demo-sized (200 steps, 60 held-out prompts), on the float base and on
    its NF4 experts: the 4-bit run's held-out accuracy and loss match the float run's."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "examples" / "train_demo.py"

    def run(*extra: str) -> tuple[float, float]:
        out = subprocess.run([sys.executable, str(demo), "--max-steps", "200", "--max-test", "60",
                              "--output", str(tmp_path / "-".join(extra or ("float",))), *extra],
                             capture_output=True, text=True, timeout=600, check=True).stdout
        accuracy = float(re.search(r"exact-match acc  : base [\d.]+% -> adapted ([\d.]+)%", out).group(1))
        loss = float(re.search(r"held-out loss    : base [\d.]+ -> adapted ([\d.]+)", out).group(1))
        assert "reload check     : OK" in out
        return accuracy, loss

    float_accuracy, float_loss = run()
    nf4_accuracy, nf4_loss = run("--quantize", "nf4")
    assert float_accuracy > 5  # the run learns the task at all
    assert nf4_accuracy >= float_accuracy - 5 and nf4_loss <= 1.15 * float_loss


def test_casting_back_restores_the_compute_dtype_and_mixed_kernels_refuse(qwen3_path):
    from peft_shared_moe.ops import ExpertLoraFactors, describe_experts
    from peft_shared_moe.ops.triton_mixed import mixed_refusals

    model, _ = quantized_and_reference(qwen3_path, "nf4", None)
    experts = next(m for m in model.modules() if describe_experts(m) is not None)
    model.half()
    assert experts.gate_up_proj.dtype == torch.float16
    model.float()
    assert experts.gate_up_proj.dtype == torch.float32 and experts.gate_up_proj.absmax.dtype == torch.float32
    lora = ExpertLoraFactors({f: torch.zeros(1 if f in ("w1.lora_A", "w3.lora_A", "w2.lora_B") else 6, *s)
                              for f, s in {"w1.lora_A": (2, 32), "w3.lora_A": (2, 32), "w1.lora_B": (16, 2),
                                           "w3.lora_B": (16, 2), "w2.lora_A": (2, 16), "w2.lora_B": (32, 2)}.items()}, 1.0)
    with torch.no_grad():
        reasons = mixed_refusals(torch.randn(3, 32), (experts.gate_up_proj, experts.down_proj), [lora])
    assert any("held quantized" in r for r in reasons)


def test_saving_the_quantized_base_is_refused_and_writes_nothing(qwen3_path, tmp_path):
    """transformers would write buffers no loader reads back (the experts would reload random); the
    adapter saves as usual."""
    from peft import get_peft_model

    from peft_shared_moe import QuantizationError, SharedMoeLoraConfig

    model, _ = quantized_and_reference(qwen3_path, "nf4", None)
    target = tmp_path / "base"
    with pytest.raises(QuantizationError, match=r"held quantized by peft_shared_moe.*save the adapter instead"):
        model.save_pretrained(target)
    assert not target.exists()
    peft_model = get_peft_model(model, SharedMoeLoraConfig(r=4))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(QuantizationError):
        peft_model.unload().save_pretrained(target)
    assert not target.exists()


class _WrappedWeight(torch.Tensor):
    """A tensor subclass that reports a float dtype while its values live elsewhere (as torchao's
    quantized tensors do)."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return _WrappedWeight(inner_tensors["inner"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, _WrappedWeight) else t  # noqa: E731
        return func(*map(unwrap, args), **{k: unwrap(v) for k, v in (kwargs or {}).items()})


def test_a_tensor_subclass_weight_is_refused_naming_its_class(qwen3_path):
    from peft import get_peft_model

    from peft_shared_moe import SharedMoeLoraConfig, UnsupportedExpertsError
    from peft_shared_moe.ops import describe_experts
    from tests.conftest import load

    model = load(qwen3_path, dtype=torch.float32)
    experts = next(m for m in model.modules() if describe_experts(m) is not None)
    weight = experts.gate_up_proj.detach()
    del experts.gate_up_proj
    experts.gate_up_proj = _WrappedWeight(weight)
    assert experts.gate_up_proj.dtype == torch.float32
    with pytest.raises(UnsupportedExpertsError, match=r"gate_up_proj is a _WrappedWeight"):
        get_peft_model(model, SharedMoeLoraConfig(r=4))


def test_quantize_experts_refuses_meta_and_sharded_weights_changing_nothing(qwen3_path, monkeypatch):
    from peft_shared_moe import QuantizationError, quantize
    from peft_shared_moe.ops import describe_experts
    from tests.conftest import load

    model = load(qwen3_path, dtype=torch.float32)
    blocks = [m for m in model.modules() if describe_experts(m) is not None]
    blocks[-1].down_proj = torch.nn.Parameter(torch.empty(blocks[-1].down_proj.shape, device="meta"))
    before = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    with pytest.raises(QuantizationError, match=r"layers\.\d+\.mlp\.experts\.down_proj is on the meta device"):
        quantize.quantize_experts(model, "nf4")
    sharded = blocks[0].gate_up_proj
    monkeypatch.setattr(quantize, "is_dtensor", lambda t: t is sharded)
    with pytest.raises(QuantizationError, match=r"layers\.0\.mlp\.experts\.gate_up_proj is a DTensor .*before sharding"):
        quantize.quantize_experts(model, "fp8", 16)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(type(getattr(b, "gate_up_proj")).__name__.endswith("ExpertWeights") for b in blocks)


def test_an_int_fp8_block_means_a_square_block(qwen3_path):
    from peft_shared_moe import QuantizationError, quantize_experts
    from peft_shared_moe.ops import describe_experts
    from peft_shared_moe.ops.quantized import Fp8ExpertWeights

    model, _ = quantized_and_reference(qwen3_path, "fp8", 16)
    experts = next(m for m in model.modules() if describe_experts(m) is not None)
    assert experts.gate_up_proj.block == (16, 16) and experts.gate_up_proj.scale_inv.shape[1:] == (2, 2)
    for bad in (0, (16,), (16, "x")):
        with pytest.raises(QuantizationError, match="FP8 block must be a positive int or a"):
            Fp8ExpertWeights(torch.randn(2, 32, 32), bad)
    from tests.conftest import load

    with pytest.raises(QuantizationError, match=r"FP8 block \(24, 24\) must divide"):
        quantize_experts(load(qwen3_path, dtype=torch.float32), "fp8", 24)


def fine_grained_fp8_model(path, block=(16, 16)):
    """The test model with its experts swapped for transformers' FineGrainedFP8 `FP8Experts` (built as
    transformers builds them for an FP8 checkpoint) holding FP8 values and scales, and the float64
    reference whose experts hold those values dequantized."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
    from transformers.integrations.moe import use_experts_implementation

    from peft_shared_moe.ops import describe_experts
    from tests.conftest import load

    model = load(path, dtype=torch.float32)
    reference = load(path, dtype=torch.float64, experts_implementation="eager")
    fp8_class = use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS,
                                           has_bias=False, has_gate=True)
    names = [n for n, m in model.named_modules() if describe_experts(m) is not None]
    for name in names:
        experts, ref = model.get_submodule(name), reference.get_submodule(name)
        fp8 = fp8_class(config=experts.config, block_size=block, activation_scheme="dynamic")
        with torch.no_grad():
            for p in ("gate_up_proj", "down_proj"):
                q = quantize_fp8_blockwise(getattr(experts, p).detach(), block)
                getattr(fp8, p).copy_(q.weight)
                getattr(fp8, f"{p}_scale_inv").copy_(q.scale_inv)
                getattr(ref, p).copy_(dequantize_fp8_blockwise(q, torch.float64))
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, fp8)
    return model, reference


def test_fine_grained_fp8_experts_are_adopted_as_stored_and_compute_on_their_values(qwen3_path):
    """quantize_experts(model, "fp8") on FineGrainedFP8 experts keeps their very bytes (no copy), and
    the model computes x @ dequantize(W)^T: logits against float64 on the dequantized weights, with
    and without an adapter; the other schemes are refused for them."""
    from peft import get_peft_model

    from peft_shared_moe import QuantizationError, SharedMoeLoraConfig, quantize_experts
    from peft_shared_moe.ops import describe_experts
    from peft_shared_moe.ops.quantized import Fp8ExpertWeights
    from tests.conftest import input_ids, randomize_adapter

    model, reference = fine_grained_fp8_model(qwen3_path)
    first = next(m for m in model.modules() if hasattr(m, "gate_up_proj_scale_inv"))
    stored = first.gate_up_proj.data_ptr()
    with pytest.raises(QuantizationError, match="can be adopted as 'fp8' only"):
        quantize_experts(model, "nf4")
    quantize_experts(model, "fp8")
    assert isinstance(first.gate_up_proj, Fp8ExpertWeights) and first.gate_up_proj.weight.data_ptr() == stored
    assert first.gate_up_proj.dtype == torch.float32 and not hasattr(first, "gate_up_proj_scale_inv")
    assert describe_experts(first) is not None
    ids = input_ids()
    with torch.no_grad():
        assert rel(model(input_ids=ids).logits, reference(input_ids=ids).logits) < 1e-5
    models = [get_peft_model(m, SharedMoeLoraConfig(r=4)) for m in (model, reference)]
    for m in models:
        randomize_adapter(m, seed=2)
    with torch.no_grad():
        got, want = (m(input_ids=ids).logits for m in models)
    assert rel(got, want) < 1e-5


def test_fine_grained_fp8_variants_it_cannot_read_are_refused_changing_nothing(qwen3_path):
    from peft_shared_moe import QuantizationError, quantize_experts

    model, _ = fine_grained_fp8_model(qwen3_path)
    blocks = [m for m in model.modules() if hasattr(m, "gate_up_proj_scale_inv")]
    blocks[0].activation_scheme = "static"
    blocks[0].down_proj_scale_inv.data = blocks[0].down_proj_scale_inv.data.to(torch.bfloat16)
    # the last block's down_proj scales sized for a block that does not divide I = 16 (transformers
    # allocates ceil-sized scales): found before the first block is adopted
    blocks[-1].block_size = (16, 32)
    blocks[-1].down_proj_scale_inv.data = blocks[-1].down_proj_scale_inv.data[:, :, :1].contiguous()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=r"activation_scheme='static'.*down_proj_scale_inv is torch.bfloat16"
                                                 r".*layers\.\d\.mlp\.experts\.down_proj: FP8 block \(16, 32\) must divide"):
        quantize_experts(model, "fp8")
    with pytest.raises(QuantizationError, match=r"adopted with their stored block \(16, 16\); pass no block"):
        quantize_experts(model, "fp8", 16)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_merge_into_an_fp8_linear_is_refused(qwen3_path):
    """A dense linear whose weight is FP8 (FineGrainedFP8's FP8Linear): the merge would write the sum
    into 8-bit storage, so it is refused before any layer changes."""
    from peft import get_peft_model

    from peft_shared_moe import SharedMoeLoraConfig
    from tests.conftest import load, randomize_adapter

    model = get_peft_model(load(qwen3_path, dtype=torch.float32), SharedMoeLoraConfig(r=4, target_modules=["experts", "q_proj"]))
    randomize_adapter(model)
    q_proj = next(m for n, m in model.named_modules() if n.endswith("layers.1.self_attn.q_proj.base_layer"))
    q_proj.weight = torch.nn.Parameter(q_proj.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot merge into Linear: \['weight'\] are held quantized \(torch.float8_e4m3fn\)"):
        model.merge_adapter()
    after = model.state_dict()
    assert all(torch.equal(before[k].float(), after[k].float()) for k in before)


@pytest.mark.gpu
def test_a_fine_grained_fp8_load_is_adopted_and_each_block_computes_on_its_stored_values(qwen3_path):
    """transformers quantizes the checkpoint to FineGrainedFP8 while loading it on the GPU (its FP8Experts
    hold e4m3 values and scale_inv); quantize_experts adopts them as stored and every experts block then
    computes with them dequantized: each block against the naive float64 loop on those values."""
    from transformers import FineGrainedFP8Config

    from peft_shared_moe import quantize_experts
    from tests.conftest import load
    from tests.reference import naive_moe_lora

    model = load(qwen3_path, dtype=torch.bfloat16, device_map="cuda",
                 quantization_config=FineGrainedFP8Config(weight_block_size=(16, 16)))
    blocks = [m for m in model.modules() if hasattr(m, "gate_up_proj_scale_inv")]
    assert blocks and blocks[0].gate_up_proj.dtype == torch.float8_e4m3fn
    stored = [{p: dequantize_fp8_blockwise(Fp8BlockWeight(getattr(b, p).detach(), getattr(b, f"{p}_scale_inv").detach(),
                                                          (16, 16)), torch.float64).cpu()
               for p in ("gate_up_proj", "down_proj")} for b in blocks]
    quantize_experts(model, "fp8")
    gen = torch.Generator().manual_seed(4)
    for block, weights in zip(blocks, stored):
        x = torch.randn(11, weights["gate_up_proj"].shape[2], generator=gen)
        idx = torch.stack([torch.randperm(weights["down_proj"].shape[0], generator=gen)[:2] for _ in range(11)])
        w = torch.softmax(torch.randn(11, 2, generator=gen), -1)
        with torch.no_grad():
            got = block(x.to("cuda", torch.bfloat16), idx.cuda(), w.to("cuda", torch.bfloat16))
        want = naive_moe_lora(x, idx, w, weights["gate_up_proj"], weights["down_proj"], None, 0.0)
        assert rel(got.float().cpu(), want) < 1e-2


# ---- quantized while transformers loads the checkpoint (quantized_loading.py) ----------------------

@pytest.mark.parametrize("scheme,block,arch", [("nf4", 16, "qwen3"), ("fp8", (16, 16), "qwen3"), ("nf4", 16, "mixtral")])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(request, tmp_path, scheme, block, arch):
    """from_pretrained(..., quantization_config=ExpertsQuantizationConfig) holds the same quantized
    values as quantize_experts on the plainly loaded model, loads every other weight unchanged with
    a clean report, gives the same logits, and trains an adapter; its save_pretrained refuses."""
    from peft import get_peft_model

    from peft_shared_moe import ExpertsQuantizationConfig, QuantizationError, SharedMoeLoraConfig, quantize_experts
    from peft_shared_moe.ops import describe_experts
    from tests.conftest import input_ids, load

    path = request.getfixturevalue(f"{arch}_path")  # each architecture's own checkpoint conversion
    model, info = load(path, dtype=torch.float32, quantization_config=ExpertsQuantizationConfig(scheme, block),
                       output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    plain = quantize_experts(load(path, dtype=torch.float32), scheme, block)
    got, want = model.state_dict(), plain.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    blocks = [m for m in model.modules() if describe_experts(m) is not None]
    assert blocks and all(type(b.gate_up_proj).__name__.lower().startswith(scheme) for b in blocks)
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    with pytest.raises(QuantizationError, match="held quantized by peft_shared_moe.*save the adapter instead"):
        model.save_pretrained(tmp_path / "base")
    assert not (tmp_path / "base").exists()
    peft_model = get_peft_model(model, SharedMoeLoraConfig(r=4, init_lora_weights=False))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "experts" in n and p.requires_grad)


def test_quantizing_while_loading_refuses_a_block_that_does_not_divide_before_reading(qwen3_path, monkeypatch):
    from transformers import modeling_utils

    from peft_shared_moe import ExpertsQuantizationConfig, QuantizationError
    from tests.conftest import load

    opened = []
    real_open = modeling_utils.safe_open
    monkeypatch.setattr(modeling_utils, "safe_open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    load(qwen3_path)
    assert opened  # the hook sees the checkpoint being read
    opened.clear()
    with pytest.raises(QuantizationError, match=r"experts\.gate_up_proj: NF4 block size 48 must be even and divide"):
        load(qwen3_path, quantization_config=ExpertsQuantizationConfig("nf4", 48))
    assert opened == []  # refused before a tensor was read
    with pytest.raises(QuantizationError, match=r"scheme 'int4' is not supported"):
        ExpertsQuantizationConfig("int4")
    for bad in ((16, 16), 16.0, 15, True):
        with pytest.raises(QuantizationError, match="NF4 block size must be a positive even int"):
            ExpertsQuantizationConfig("nf4", bad)
    with pytest.raises(QuantizationError, match="FP8 block must be a positive int or a"):
        ExpertsQuantizationConfig("fp8", (16, "x"))


def test_the_quantized_kernels_launch_on_the_layers_device(monkeypatch):
    """A device_map may put layers on several GPUs: inference and both training halves enter the
    device guard with the hidden states (on the CPU the guard is a no-op; the call is what is checked)."""
    import contextlib

    from peft_shared_moe.ops import EXPERTS_BACKENDS, ExpertLoraFactors, triton_experts, triton_quantized

    entered = []
    for module in (triton_experts, triton_quantized):  # inference's guard; the training halves' (around dequantizing)
        monkeypatch.setattr(module, "device_guard", lambda t: entered.append(t.device) or contextlib.nullcontext())
    device, gate_up, down, x, idx, w, factors = quantized_layer("nf4", 16)
    lora = ExpertLoraFactors({f: t.float().to(device).requires_grad_() for f, t in factors.items()}, 0.5)
    x, idx, w = x.to(device), idx.to(device), w.to(device)
    with torch.no_grad():
        EXPERTS_BACKENDS["triton"](x, idx, w, gate_up, down, None, lora=lora)
    assert entered == [x.device]
    EXPERTS_BACKENDS["triton"](x, idx, w, gate_up, down, None, lora=lora).sum().backward()
    assert entered == [x.device] * 3


def test_a_compiled_quantized_model_computes_what_the_eager_one_does(qwen3_path):
    """Under torch.compile the quantized kernels refuse and "auto" takes the torch path: the compiled
    forward (aot_eager on the CPU) equals the eager one."""
    from peft_shared_moe import ExpertsQuantizationConfig
    from tests.conftest import input_ids, load

    model = load(qwen3_path, dtype=torch.float32, quantization_config=ExpertsQuantizationConfig("nf4", 16))
    ids = input_ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = torch.compile(model, backend="aot_eager")(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_fused_shrink_on_a_quantized_weight_is_refused():
    """The quantized kernel has no extra shrink programs or kept pre-activation: asking for them raises."""
    from peft_shared_moe.ops.block_routing import align_pairs_to_blocks
    from peft_shared_moe.ops.kernel_configs import INTERPRETER, KernelConfig
    from peft_shared_moe.ops.triton_experts import ExpertGemm, LoraShrink, launch

    device, gate_up, down, x, idx, w, factors = quantized_layer("nf4", 16)
    config = KernelConfig(**INTERPRETER)
    routing = align_pairs_to_blocks(idx.to(device), gate_up.shape[0], config.block_m)
    h = torch.randn(idx.numel(), down.shape[2], device=device)
    shrink = LoraShrink(factors["w2.lora_A"].float().to(device), torch.empty(idx.numel(), 4, device=device))
    with pytest.raises(ValueError, match="the quantized GEMM has no fused shrink"):
        launch(ExpertGemm(h, down, torch.empty(idx.numel(), 32, device=device), routing, config, "ieee", shrink=shrink))
