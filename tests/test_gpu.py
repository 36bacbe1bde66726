"""The life cycle on a CUDA device in bf16 (skipped on CPU)."""

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


def test_device_map_keeps_factors_with_their_layer(qwen3_path):
    n_gpus = torch.cuda.device_count()
    device_map = {"model.embed_tokens": 0, "model.norm": n_gpus - 1, "model.rotary_emb": 0, "lm_head": n_gpus - 1}
    device_map.update({f"model.layers.{i}": i % n_gpus for i in range(3)})
    model = get_peft_model(load(qwen3_path, device_map=device_map), SharedMoeLoraConfig(r=4))
    seen = set()
    for module in model.modules():
        if isinstance(module, ExpertsLoraLayer):
            device = module.get_base_layer().gate_up_proj.device
            seen.add(device)
            assert all(p.device == device for n, p in module.named_parameters() if n.startswith("lora_"))
    assert len(seen) == min(n_gpus, 2)
    ids = input_ids().cuda()
    model(input_ids=ids, labels=ids).loss.backward()


def test_offloaded_layers_are_refused(qwen3_path):
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": "cpu",
                  "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    with pytest.raises(ValueError, match="offloaded"):
        get_peft_model(load(qwen3_path, device_map=device_map), SharedMoeLoraConfig(r=4))
