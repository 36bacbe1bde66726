"""On a CUDA device (skipped on CPU): the life cycle in bf16, float32 precision, the Triton refusals on
the GPU, and multi-GPU device maps (skipped unless there are two GPUs)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_shared_moe import SharedMoeLoraConfig
from peft_shared_moe.tuners import ExpertsLoraLayer
from tests.conftest import input_ids, load, randomize_adapter
from tests.reference import naive_moe_lora

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shared", [True, False])
def test_bf16_cuda_experts_layer_against_float64_loop(qwen3_path, shared):
    """One experts layer with fixed routing: bf16 on CUDA within 1e-2 of the float64 naive loop."""
    cfg = SharedMoeLoraConfig(r=4, lora_alpha=8, shared_outer=shared)
    model = get_peft_model(load(qwen3_path, dtype=torch.bfloat16, device_map="cuda"), cfg)
    randomize_adapter(model, seed=11)
    layer = next(m for m in model.modules() if isinstance(m, ExpertsLoraLayer))
    gen = torch.Generator().manual_seed(0)
    T, k = 64, 2
    x = torch.randn(T, 32, generator=gen).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(5, generator=gen)[:k] for _ in range(T)])  # expert 5 gets no token
    w = torch.softmax(torch.randn(T, k, generator=gen), -1).to(torch.bfloat16)
    got = layer(x.cuda(), idx.cuda(), w.cuda()).double().cpu()
    base = layer.get_base_layer()
    factors = {name: t.detach().cpu() for name, t in layer.factor_params("default").items()}
    want = naive_moe_lora(x, idx, w, base.gate_up_proj.cpu(), base.down_proj.cpu(), factors, 2.0)
    assert ((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("shared", [True, False])
def test_bf16_cuda_model_against_float32_cpu(qwen3_path, shared):
    cfg = SharedMoeLoraConfig(r=4, lora_alpha=8, shared_outer=shared)
    model = get_peft_model(load(qwen3_path, dtype=torch.bfloat16, device_map="cuda"), cfg)
    randomize_adapter(model, seed=11, scale=0.1)
    ids = input_ids().cuda()
    got = model(input_ids=ids).logits.float().cpu()
    # same bf16-rounded weights, float32 arithmetic on the CPU
    reference = get_peft_model(load(qwen3_path), cfg)
    reference.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    with torch.no_grad():
        want = reference(input_ids=ids.cpu()).logits
    assert ((got - want).norm() / want.norm()) < 5e-2

    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.device.type == "cuda" and p.dtype == torch.float32 and p.grad.abs().sum() > 0, name


def test_cuda_generate_save_load_merge(qwen3_path, tmp_path):
    model = get_peft_model(load(qwen3_path, dtype=torch.bfloat16, device_map="cuda"), SharedMoeLoraConfig(r=4))
    randomize_adapter(model, seed=12, scale=0.05)
    ids = input_ids(length=6).cuda()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 11)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load(qwen3_path, dtype=torch.bfloat16, device_map="cuda"), tmp_path)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, want)
        merged = loaded.merge_and_unload()(input_ids=ids).logits
    assert ((merged.float() - want.float()).norm() / want.float().norm()) < 3e-2


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def assert_factors_with_their_layer(model) -> set[torch.device]:
    """Every experts layer's six factors sit on its base layer's device; returns the devices of the layers."""
    seen = set()
    for module in model.modules():
        if isinstance(module, ExpertsLoraLayer):
            device = module.get_base_layer().gate_up_proj.device
            seen.add(device)
            factors = {n: p for n, p in module.named_parameters() if ".lora_" in n}
            assert len(factors) == 6, sorted(factors)
            assert all(p.device == device for p in factors.values()), {n: p.device for n, p in factors.items()}
    return seen


def assert_spread_model_matches_one_gpu(qwen3_path, model) -> None:
    """Same logits as the model on one GPU with the same adapter, and a gradient for every factor."""
    randomize_adapter(model, seed=13)
    single = get_peft_model(load(qwen3_path, device_map="cuda:0"), SharedMoeLoraConfig(r=4))
    single.load_state_dict({k: v.to("cuda:0") for k, v in model.state_dict().items()})
    ids = input_ids().cuda()
    with torch.no_grad():
        want = single(input_ids=ids).logits
        got = model(input_ids=ids).logits.to(want.device)
    assert ((got - want).norm() / want.norm()) < 1e-5
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@two_gpus
def test_device_map_keeps_factors_with_their_layer(qwen3_path):
    """The two MoE layers (0 and 2; layer 1 is dense) on different GPUs, factors beside each."""
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.layers.2": 1, "model.norm": 1, "lm_head": 1}
    model = get_peft_model(load(qwen3_path, device_map=device_map), SharedMoeLoraConfig(r=4))
    assert assert_factors_with_their_layer(model) == {torch.device("cuda", 0), torch.device("cuda", 1)}
    assert_spread_model_matches_one_gpu(qwen3_path, model)


@two_gpus
def test_device_map_auto_over_two_gpus(qwen3_path):
    """device_map="auto" with each GPU capped at 80 % of the model, so accelerate must spread it
    (checked: it puts layer 0 on GPU 0, the rest on GPU 1); the test fails if it did not spread."""
    size = sum(p.numel() * p.element_size() for p in load(qwen3_path).parameters())
    model = get_peft_model(
        load(qwen3_path, device_map="auto", max_memory={0: int(size * 0.8), 1: int(size * 0.8)}),
        SharedMoeLoraConfig(r=4),
    )
    assert len(assert_factors_with_their_layer(model)) == 2, model.base_model.model.hf_device_map
    assert_spread_model_matches_one_gpu(qwen3_path, model)


def test_offloaded_layers_are_refused(qwen3_path):
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": "cpu",
                  "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    with pytest.raises(ValueError, match="offloaded"):
        get_peft_model(load(qwen3_path, device_map=device_map), SharedMoeLoraConfig(r=4))


def float32_triton_layer(qwen3_path, backend: str = "triton"):
    model = get_peft_model(load(qwen3_path, device_map="cuda"), SharedMoeLoraConfig(r=4, lora_alpha=8, backend=backend))
    randomize_adapter(model, seed=14)
    return model, next(m for m in model.modules() if isinstance(m, ExpertsLoraLayer))


def test_float32_triton_layer_against_float64_follows_matmul_precision(qwen3_path):
    """float32 runs full-precision dots at torch's default "highest" (it was TF32, 2.4e-3 off on an
    H100), and TF32 only once torch allows it ("high")."""
    _, layer = float32_triton_layer(qwen3_path)
    gen = torch.Generator().manual_seed(1)
    T, k = 96, 2
    x = torch.randn(T, 32, generator=gen)
    idx = torch.stack([torch.randperm(6, generator=gen)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=gen), -1)
    base = layer.get_base_layer()
    factors = {name: t.detach().cpu() for name, t in layer.factor_params("default").items()}
    want = naive_moe_lora(x, idx, w, base.gate_up_proj.cpu(), base.down_proj.cpu(), factors, 2.0)
    old = torch.get_float32_matmul_precision()
    errors = {}
    try:
        for setting in ["highest", "high"]:
            torch.set_float32_matmul_precision(setting)
            with torch.no_grad():
                got = layer(x.cuda(), idx.cuda(), w.cuda()).double().cpu()
            errors[setting] = ((got - want).norm() / want.norm()).item()
    finally:
        torch.set_float32_matmul_precision(old)
    assert errors["highest"] < 1e-5, errors
    assert 1e-5 < errors["high"] < 5e-3, errors  # TF32 really is used when allowed


def test_triton_backend_refuses_gelu_experts_on_cuda(tmp_path):
    from peft_shared_moe.ops.triton_support import TritonBackendError
    from tests.conftest import qwen3_moe_config, save_random_model

    path = save_random_model(qwen3_moe_config(hidden_act="gelu"), tmp_path, seed=5)
    model = get_peft_model(load(path, device_map="cuda"), SharedMoeLoraConfig(r=4, backend="triton"))
    with torch.no_grad(), pytest.raises(TritonBackendError, match="SiLU"):
        model(input_ids=input_ids().cuda())


def test_experts_implementation_on_cuda_is_exact_in_inference_and_training(qwen3_path, monkeypatch):
    """experts_implementation="peft_shared_moe": the kernels under no_grad (float32, full precision),
    the torch path in training; both against transformers' eager experts."""
    from peft_shared_moe.ops import EXPERTS_BACKENDS

    calls = []
    triton_forward = EXPERTS_BACKENDS["triton"]
    monkeypatch.setitem(EXPERTS_BACKENDS, "triton", lambda *a, **k: calls.append(1) or triton_forward(*a, **k))
    ours = load(qwen3_path, experts_implementation="peft_shared_moe", device_map="cuda")
    eager = load(qwen3_path, experts_implementation="eager", device_map="cuda")
    ids = input_ids().cuda()
    with torch.no_grad():
        got, want = ours(input_ids=ids).logits, eager(input_ids=ids).logits
    assert len(calls) == 2
    assert ((got - want).norm() / want.norm()) < 1e-5
    ours(input_ids=ids, labels=ids).loss.backward()
    eager(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # training did not run the kernels
    for (name, p), (_, q) in zip(ours.named_parameters(), eager.named_parameters()):
        if "experts" in name:
            assert ((p.grad - q.grad).norm() / q.grad.norm()) < 1e-2, name  # grouped_mm may use TF32
