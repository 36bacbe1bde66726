"""Mixed-adapter batches, PEFT's convention: `model(..., adapter_names=[...])` and
`generate(..., adapter_names=[...])`, one adapter name per sample, "__base__" for none. Each sample
must get what it gets when the whole batch runs with its adapter alone (float64, left padding
included), on the torch path and on the Triton kernels (the interpreter on CPU); and bad input gets
a clear error."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_shared_moe import SharedMoeLoraConfig
from tests.conftest import input_ids, load, randomize_adapter

NAMES = ["a", "__base__", "b", "a"]


def two_adapters(path, backend: str = "torch", dtype=torch.float64):
    """Adapter "a" shared-outer r=4 and "b" per-expert r=6, each on experts and q/v, random non-zero factors."""
    model = load(path, dtype=dtype, experts_implementation="eager",  # the base alone in float64 too
                 device_map="cuda" if torch.cuda.is_available() and backend == "triton" else None)
    model = get_peft_model(model, SharedMoeLoraConfig(r=4, target_modules=["experts", "q_proj", "v_proj"],
                                                     backend=backend), adapter_name="a")
    model.add_adapter("b", SharedMoeLoraConfig(r=6, shared_outer=False, target_modules=["experts", "q_proj", "v_proj"],
                                               backend=backend))
    randomize_adapter(model, "a", seed=1, scale=0.2)
    randomize_adapter(model, "b", seed=2, scale=0.2)
    return model.eval()


def batch(device="cpu"):
    """Four samples, the second and fourth left-padded."""
    ids = input_ids(batch=4, length=10).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :5] = 0
    return ids, mask


def each_alone(model, ids, mask, names):
    """Reference: the whole batch with one adapter at a time (or none), each sample's row kept."""
    rows = {}
    with torch.no_grad():
        for name in set(names):
            if name == "__base__":
                with model.disable_adapter():
                    rows[name] = model(input_ids=ids, attention_mask=mask).logits
            else:
                model.set_adapter(name)
                rows[name] = model(input_ids=ids, attention_mask=mask).logits
    return torch.stack([rows[name][i] for i, name in enumerate(names)])


def rel_err(a, b, mask):
    keep = mask.bool()
    return ((a[keep] - b[keep]).norm() / b[keep].norm()).item()


def test_each_sample_gets_its_own_adapter(qwen3_path):
    model = two_adapters(qwen3_path)
    ids, mask = batch()
    want = each_alone(model, ids, mask, NAMES)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    assert rel_err(got, want, mask) < 1e-12
    # the references really differ: each sample's adapter matters
    assert rel_err(want[0:1], each_alone(model, ids, mask, ["b"] * 4)[0:1], mask[0:1]) > 1e-3


def test_generate_with_mixed_adapters_equals_each_adapter_alone(qwen3_path):
    model = two_adapters(qwen3_path)
    ids, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(input_ids=ids, adapter_names=NAMES, **kwargs)
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with model.disable_adapter():
                    want = model.generate(input_ids=ids, **kwargs)
            else:
                model.set_adapter(name)
                want = model.generate(input_ids=ids, **kwargs)
            assert torch.equal(got[i], want[i]), (i, name)


def test_a_deleted_adapter_leaves_no_stale_slot(qwen3_path):
    model = two_adapters(qwen3_path)
    ids, mask = batch()
    model.base_model.delete_adapter("b")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['b'\]"):
        model(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    names = ["a", "__base__", "a", "a"]
    want = each_alone(model, ids, mask, names)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert rel_err(got, want, mask) < 1e-12


def test_triton_kernels_serve_a_mixed_batch(qwen3_path, monkeypatch):
    """The same through the Triton backend, every adapter in one call of the mixed kernels per layer
    (float32), against each adapter alone on the single-adapter kernels."""
    from peft_shared_moe.ops import triton_mixed

    model = two_adapters(qwen3_path, backend="triton", dtype=torch.float32)
    device = next(model.parameters()).device
    ids, mask = batch(device)
    want = each_alone(model, ids, mask, NAMES)
    calls = []
    mixed = triton_mixed.triton_mixed_experts_forward
    monkeypatch.setattr(triton_mixed, "triton_mixed_experts_forward", lambda *a, **k: calls.append(1) or mixed(*a, **k))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    from peft_shared_moe.tuners import ExpertsLoraLayer

    assert len(calls) == sum(isinstance(m, ExpertsLoraLayer) for m in model.modules())  # no fallback per adapter
    assert rel_err(got.double(), want.double(), mask) < 1e-5


def test_bad_adapter_names_are_refused(qwen3_path):
    model = two_adapters(qwen3_path)
    ids, mask = batch()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]"):
            model(input_ids=ids, adapter_names=["a", "c", "a", "a"])
        with pytest.raises(ValueError, match="3 names but the batch has 4 samples"):
            model(input_ids=ids, adapter_names=["a", "b", "a"])
        with pytest.raises(TypeError, match="one per sample"):
            model(input_ids=ids, adapter_names="a")
    model.train()
    with pytest.raises(ValueError, match="for inference"):
        model(input_ids=ids, adapter_names=NAMES)
    model.eval()
    model.base_model.merge_adapter(["a"])
    with torch.no_grad(), pytest.raises(ValueError, match="unmerge_adapter"):
        model(input_ids=ids, adapter_names=NAMES)
    with pytest.raises(ValueError, match="__base__"):
        model.add_adapter("__base__", SharedMoeLoraConfig(r=2))


def test_modules_to_save_and_shared_experts_follow_the_names(tmp_path):
    """A copied lm_head (modules_to_save) takes each sample's copy; a targeted linear that gets the
    tokens flattened (Qwen2-MoE's shared expert) groups them per sample."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, max_position_embeddings=64)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.2)
    targets = dict(target_modules=["experts", "gate_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(model, SharedMoeLoraConfig(r=4, **targets), adapter_name="a")
    model.add_adapter("b", SharedMoeLoraConfig(r=2, shared_outer=False, **targets))
    randomize_adapter(model, "a", seed=1, scale=0.2)
    randomize_adapter(model, "b", seed=2, scale=0.2)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["b"].weight.add_(0.5)
    model.eval()
    ids = input_ids(batch=3, length=5)
    mask = torch.ones_like(ids)
    names = ["b", "a", "__base__"]
    want = each_alone(model, ids, mask, names)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert rel_err(got, want, mask) < 1e-12


def test_the_base_output_a_hook_keeps_is_not_written_into(qwen3_path):
    """The LoRA delta may be added into the base linear's output in place only when nobody else holds
    it: a forward hook that keeps the output (activation caching) must find it unchanged, in a plain
    forward and in a mixed batch."""
    model = two_adapters(qwen3_path, backend="triton", dtype=torch.float32)
    device = next(model.parameters()).device
    ids, mask = batch(device)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    kept = []
    handle = q_proj.get_base_layer().register_forward_hook(lambda m, a, out: kept.append((out, out.clone())))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    finally:
        handle.remove()
    assert len(kept) == 2
    for out, copy in kept:
        assert torch.equal(out, copy)


def test_factors_of_a_parametrized_weight(qwen3_path):
    """A factor whose weight is not a registered parameter (a parametrization) is still found."""
    from torch.nn.utils import parametrize

    from peft_shared_moe.tuners import ExpertsLoraLayer

    model = two_adapters(qwen3_path)
    layer = next(m for m in model.modules() if isinstance(m, ExpertsLoraLayer))
    module = layer.factor_dict("w1.lora_B")["a"]

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    before = module.weight.detach().clone()
    parametrize.register_parametrization(module, "weight", Doubled())
    assert torch.equal(layer.factors("a")["w1.lora_B"], 2 * before)
