"""The PEFT life cycle on tiny random MoE models: inject, train, generate, save/load, adapters, merge."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from peft_shared_moe import SharedMoeLoraConfig
from peft_shared_moe.tuners import ExpertsLoraLayer
from tests.conftest import input_ids, load, randomize_adapter
from tests.reference import merged_state_dict

# transformers' grouped_mm experts have no float64 kernel; its eager loop is the float64 base.
FLOAT64 = dict(dtype=torch.float64, experts_implementation="eager")


def config(**kw) -> SharedMoeLoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return SharedMoeLoraConfig(**kw)


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


@pytest.mark.parametrize("shared", [True, False])
def test_fresh_adapter_is_identity_and_saved_layout(qwen3_path, shared):
    base = load(qwen3_path)
    ref = logits(base)
    model = get_peft_model(base, config(shared_outer=shared))
    # equal up to float32 summation order (our grouped path vs transformers' experts forward)
    torch.testing.assert_close(logits(model), ref, rtol=1e-6, atol=1e-6)

    sd = get_peft_model_state_dict(model)
    E, H, I, r = 6, 32, 16, 4
    outer = 1 if shared else E
    expected = {}
    for layer in (0, 2):  # layer 1 is dense (mlp_only_layers)
        p = f"base_model.model.model.layers.{layer}.mlp.experts."
        expected.update(
            {
                p + "w1.lora_A.weight": (outer, r, H),
                p + "w1.lora_B.weight": (E, I, r),
                p + "w3.lora_A.weight": (outer, r, H),
                p + "w3.lora_B.weight": (E, I, r),
                p + "w2.lora_A.weight": (E, r, I),
                p + "w2.lora_B.weight": (outer, H, r),
            }
        )
    for layer in range(3):
        for proj, out in [("q_proj", 32), ("k_proj", 16), ("v_proj", 16), ("o_proj", 32)]:
            p = f"base_model.model.model.layers.{layer}.self_attn.{proj}."
            expected[p + "lora_A.weight"] = (r, 32)
            expected[p + "lora_B.weight"] = (out, r)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


@pytest.mark.parametrize("shared", [True, False])
def test_forward_matches_independently_merged_model_float64(qwen3_path, shared):
    base = load(qwen3_path, **FLOAT64)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config(shared_outer=shared, use_rslora=True))
    randomize_adapter(model)
    got = logits(model)

    reference = load(qwen3_path, **FLOAT64)
    scaling = 8 / 4**0.5
    reference.load_state_dict(merged_state_dict(base_state, get_peft_model_state_dict(model), scaling))
    want = logits(reference)
    assert (got - want).abs().max() < 1e-10
    assert (got - logits(load(qwen3_path, **FLOAT64))).abs().max() > 1e-3


def test_other_moe_architecture_mixtral(mixtral_path):
    base = load(mixtral_path, **FLOAT64)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config())
    layers = [m for m in model.modules() if isinstance(m, ExpertsLoraLayer)]
    assert len(layers) == 2
    randomize_adapter(model, seed=4)
    reference = load(mixtral_path, **FLOAT64)
    reference.load_state_dict(merged_state_dict(base_state, get_peft_model_state_dict(model), 2.0))
    assert (logits(model) - logits(reference)).abs().max() < 1e-10


def test_backward_reaches_every_factor_and_no_base_weight(qwen3_path):
    model = get_peft_model(load(qwen3_path), config(init_lora_weights=False))
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_gradient_checkpointing_gives_same_gradients(qwen3_path):
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(load(qwen3_path), config())
        randomize_adapter(model, seed=3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = input_ids()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_bf16_base_float32_adapter(qwen3_path):
    model = get_peft_model(load(qwen3_path, dtype=torch.bfloat16), config())
    randomize_adapter(model)
    adapter = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert adapter and all(p.dtype == torch.float32 for p in adapter.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in adapter)
    got = logits(model)
    assert got.dtype == torch.bfloat16

    full = get_peft_model(load(qwen3_path, dtype=torch.float32), config())
    full.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    want = logits(full)
    # bf16 rounding through 3 random layers; the base alone lands near 1.5e-2
    assert ((got.float() - want).norm() / want.norm()) < 5e-2
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.values())


def test_generate_greedy_and_sampling_with_padding(qwen3_path):
    model = get_peft_model(load(qwen3_path), config())
    randomize_adapter(model, seed=2)
    ids = input_ids(batch=2, length=6)
    ids[0, :2] = 0  # left padding
    mask = (ids != 0).long()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    greedy = model.generate(**kwargs, do_sample=False)
    assert greedy.shape == (2, 11)

    torch.manual_seed(0)
    sampled = model.generate(**kwargs, do_sample=True, top_k=10)
    with model.disable_adapter():
        torch.manual_seed(0)
        sampled_base = model.generate(**kwargs, do_sample=True, top_k=10)
    merged = model.merge_and_unload()
    assert torch.equal(merged.generate(**kwargs, do_sample=False), greedy)
    torch.manual_seed(0)
    # the same draws through the merged weights pick the same tokens; the base picks others
    assert torch.equal(merged.generate(**kwargs, do_sample=True, top_k=10), sampled)
    assert not torch.equal(sampled, sampled_base)


def test_generate_with_fresh_adapter_equals_base(qwen3_path):
    ids = input_ids(batch=2, length=5)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = load(qwen3_path).generate(**kwargs)
    model = get_peft_model(load(qwen3_path), config())
    assert torch.equal(model.generate(**kwargs), want)
    torch.manual_seed(3)
    sampled = model.generate(**{**kwargs, "do_sample": True})
    torch.manual_seed(3)
    assert torch.equal(sampled, load(qwen3_path).generate(**{**kwargs, "do_sample": True}))


@pytest.mark.parametrize("shared", [True, False])
def test_save_load_round_trip_is_bit_exact(qwen3_path, tmp_path, shared):
    model = get_peft_model(load(qwen3_path), config(shared_outer=shared))
    randomize_adapter(model, seed=7)
    want = logits(model)
    saved = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "adapter_model.safetensors")
    assert on_disk.keys() == saved.keys() and all(torch.equal(on_disk[k], saved[k]) for k in saved)

    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(load(qwen3_path), tmp_path, is_trainable=trainable)
        assert torch.equal(logits(loaded), want)
        reloaded = get_peft_model_state_dict(loaded)
        assert all(torch.equal(reloaded[k], saved[k]) for k in saved)
        assert all(p.requires_grad == trainable for n, p in loaded.named_parameters() if ".lora_" in n)


def test_several_adapters(qwen3_path, tmp_path):
    base_logits = logits(load(qwen3_path))
    model = get_peft_model(load(qwen3_path), config(), adapter_name="a")
    randomize_adapter(model, "a", seed=1)
    model.add_adapter("b", config(r=2, shared_outer=False))
    randomize_adapter(model, "b", seed=2)
    out_a = logits(model)  # "a" is still active
    model.set_adapter("b")
    out_b = logits(model)
    assert (out_a - out_b).abs().max() > 1e-3
    # each adapter alone equals a model that holds only that adapter
    model.save_pretrained(tmp_path)
    only_b = PeftModel.from_pretrained(load(qwen3_path), tmp_path / "b")
    torch.testing.assert_close(logits(only_b), out_b, rtol=0, atol=1e-5)
    with model.disable_adapter():
        assert torch.equal(logits(model), base_logits)
    # both active at once: the deltas of the two adapters add up inside each projection
    model.base_model.set_adapter(["a", "b"])
    both = logits(model)
    assert (both - out_a).abs().max() > 1e-3 and (both - out_b).abs().max() > 1e-3
    model.base_model.merge_adapter(["a", "b"])
    torch.testing.assert_close(logits(model), both, rtol=1e-4, atol=1e-4)
    model.base_model.unmerge_adapter()
    model.delete_adapter("b")
    assert "b" not in model.peft_config
    assert all("b" not in m.w1.lora_A for m in model.modules() if isinstance(m, ExpertsLoraLayer))
    model.set_adapter("a")
    torch.testing.assert_close(logits(model), out_a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_merge_unmerge_merge_and_unload(qwen3_path, shared):
    base = load(qwen3_path)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base_logits = logits(base)
    model = get_peft_model(base, config(shared_outer=shared))
    randomize_adapter(model, seed=5)
    unmerged = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_logits, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any(".lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert merged.state_dict().keys() == base_state.keys()
    torch.testing.assert_close(logits(merged), unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck_on_one_wrapped_experts_layer(qwen3_path, shared):
    model = get_peft_model(load(qwen3_path, **FLOAT64), config(shared_outer=shared, backend="torch"))
    randomize_adapter(model, seed=9)
    layer = next(m for m in model.modules() if isinstance(m, ExpertsLoraLayer))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(5)])  # experts 4, 5 get no token
    w = torch.rand(5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    factors = [p for n, p in layer.named_parameters() if "lora_" in n]
    assert len(factors) == 6

    def fn(x, w, *_):
        return layer(x, idx, w)

    assert torch.autograd.gradcheck(fn, (x, w, *factors), eps=1e-6, atol=1e-6, fast_mode=True)


def test_causal_lm_task_type(qwen3_path, tmp_path):
    """task_type="CAUSAL_LM" gives PEFT's causal-LM wrapper; forward, generate and reload work there too."""
    from peft import PeftModelForCausalLM

    from peft import TaskType

    assert config(task_type=TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"  # PEFT's enum, as users write it
    model = get_peft_model(load(qwen3_path), config(task_type="CAUSAL_LM"))
    assert isinstance(model, PeftModelForCausalLM)
    randomize_adapter(model, seed=6)
    ids = input_ids()
    want = logits(model, ids)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 12)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load(qwen3_path), tmp_path)
    assert isinstance(loaded, PeftModelForCausalLM)
    assert torch.equal(logits(loaded, ids), want)


def test_transformers_kernels_do_not_replace_our_experts_math(qwen3_path):
    """transformers >= 5.25 loads with use_kernels on by default (offline here, on the CPU: nothing is
    fetched) and may swap an act_fn module's forward for a hub kernel: our experts implementation stays
    selected, the adapter layers stay in place through train()/eval() (which re-kernelize), and our
    SiLU gate never calls the module's forward."""
    model = load(qwen3_path, experts_implementation="peft_shared_moe")
    assert model.config._experts_implementation == "peft_shared_moe"
    peft_model = get_peft_model(model, SharedMoeLoraConfig(r=4))
    randomize_adapter(peft_model)
    want = logits(peft_model)
    peft_model.train()
    peft_model.eval()
    experts = [m for m in peft_model.modules() if isinstance(m, ExpertsLoraLayer)]
    assert len(experts) == 2

    def swapped_forward(*args, **kwargs):
        raise AssertionError("the act_fn module's forward was called")

    for layer in experts:
        layer.get_base_layer().act_fn.forward = swapped_forward
    assert torch.equal(logits(peft_model), want)
