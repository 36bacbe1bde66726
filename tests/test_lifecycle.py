"""What PEFT's own tuners guarantee, held for ours: safe loading, all-or-nothing merges, native
loading through transformers, weighted adapters, dtype, bias and forward-argument rules."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_model_status, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_shared_moe import SharedMoeLoraConfig
from peft_shared_moe.tuners import ExpertsLoraLayer, LinearLoraLayer, SharedMoeLoraLayer
from tests.conftest import input_ids, load, qwen3_moe_config, randomize_adapter, save_random_model

EXPERTS = "base_model.model.model.layers.{}.mlp.experts"


def config(**kw) -> SharedMoeLoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return SharedMoeLoraConfig(**kw)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def snapshot(model) -> dict:
    """Everything a failed operation must leave alone: module types, parameter values and flags."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["params"].keys() == before["params"].keys()
    for name, (value, flag) in before["params"].items():
        torch.testing.assert_close(after["params"][name][0], value, rtol=0, atol=0, equal_nan=True, msg=name)
        assert after["params"][name][1] == flag, name


@pytest.fixture
def saved(qwen3_path, tmp_path):
    model = get_peft_model(load(qwen3_path), config())
    randomize_adapter(model, seed=4)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", logits(model)


def _add_key(adapter_dir, key: str, tensor: torch.Tensor) -> None:
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[key] = tensor
    save_file(tensors, path)


# ---- loading touches only adapter factors ------------------------------------------------------


@pytest.mark.parametrize(
    "key, shape",
    [
        ("base_model.model.lm_head.weight", (64, 32)),  # a base weight
        ("base_model.model.model.layers.0.mlp.experts.base_layer.gate_up_proj", (6, 32, 32)),
        ("base_model.model.model.layers.0.mlp.experts.gate_up_proj", (6, 32, 32)),
        ("base_model.model.model.layers.0.self_attn.q_proj.weight", (32, 32)),
    ],
)
def test_load_refuses_a_non_factor_key_and_leaves_the_model_as_it_was(qwen3_path, saved, key, shape):
    adapter_dir, _ = saved
    _add_key(adapter_dir, key, torch.full(shape, 7.0))
    base = load(qwen3_path)
    before = snapshot(base)
    with pytest.raises(ValueError, match="not a tensor of this adapter") as info:
        PeftModel.from_pretrained(base, adapter_dir)
    assert key in str(info.value) and "nothing was loaded" in str(info.value)
    assert_unchanged(base, before)


def test_failed_second_load_keeps_the_first_adapter(qwen3_path, saved, tmp_path):
    adapter_dir, want = saved
    model = PeftModel.from_pretrained(load(qwen3_path), adapter_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(64, 32)
    save_file(tensors, bad / "adapter_model.safetensors")
    before = snapshot(model)
    with pytest.raises(ValueError, match="lm_head.weight"):
        model.load_adapter(bad, adapter_name="other")
    assert "other" not in model.peft_config
    assert_unchanged(model, before)
    assert torch.equal(logits(model), want)


def test_set_peft_model_state_dict_refuses_a_base_key(qwen3_path):
    model = get_peft_model(load(qwen3_path), config())
    state = {f"{EXPERTS.format(0)}.w1.lora_A.weight": torch.zeros(1, 4, 32), "base_model.model.lm_head.weight": torch.zeros(64, 32)}
    lm_head = model.base_model.model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match="lm_head.weight"):
        set_peft_model_state_dict(model, state)
    assert torch.equal(model.base_model.model.lm_head.weight, lm_head)


# ---- merging is all-or-nothing -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_with_a_bad_later_layer_changes_nothing(qwen3_path, how):
    model = get_peft_model(load(qwen3_path), config(init_lora_weights=False))
    layers = [m for m in model.modules() if isinstance(m, ExpertsLoraLayer)]
    assert len(layers) == 2
    with torch.no_grad():
        layers[-1].w2.lora_B["default"].weight[0, 0, 0] = float("nan")  # the last experts layer only
    before = snapshot(model)
    with pytest.raises(ValueError, match="nothing was merged"):
        if how == "merge_adapter":
            model.merge_adapter(safe_merge=True)
        else:
            model.merge_and_unload(safe_merge=True)
    assert_unchanged(model, before)
    assert not any(m.merged for m in model.modules() if isinstance(m, SharedMoeLoraLayer))


def test_merging_adapters_that_sit_on_different_layers(qwen3_path):
    model = get_peft_model(load(qwen3_path), config(target_modules=["experts"]), adapter_name="a")
    model.add_adapter("b", config(target_modules=["q_proj"]))
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    model.base_model.set_adapter(["a", "b"])
    both = logits(model)
    model.base_model.merge_adapter(["a", "b"])
    torch.testing.assert_close(logits(model), both, rtol=1e-4, atol=1e-4)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(logits(model.merge_and_unload(adapter_names=["a", "b"])), both, rtol=1e-4, atol=1e-4)


# ---- native loading through transformers ---------------------------------------------------------


def test_transformers_native_loading_equals_peft(qwen3_path, saved):
    adapter_dir, want = saved
    peft_model = PeftModel.from_pretrained(load(qwen3_path), adapter_dir)
    assert torch.equal(logits(peft_model), want)
    assert get_model_status(peft_model).peft_types == {"default": "SHARED_MOE_LORA"}

    native = load(qwen3_path)
    native.load_adapter(str(adapter_dir))
    assert torch.equal(logits(native), want)

    # the adapter's config names the base model's folder, so transformers builds base + adapter from it
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == qwen3_path
    auto = AutoModelForCausalLM.from_pretrained(str(adapter_dir), local_files_only=True)
    assert torch.equal(logits(auto), want)


@pytest.mark.parametrize("key", ["base_model.model.lm_head.weight", "base_model.model.model.norm.weight"])
def test_transformers_native_loading_refuses_a_base_key(qwen3_path, saved, key):
    """transformers would load any key naming a model parameter over the base weights."""
    adapter_dir, _ = saved
    _add_key(adapter_dir, key, torch.full((64, 32) if "lm_head" in key else (32,), 7.0))
    base = load(qwen3_path)
    before = snapshot(base)
    with pytest.raises(ValueError, match="not LoRA factors") as info:
        base.load_adapter(str(adapter_dir))
    assert key in str(info.value)
    assert_unchanged(base, before)
    with pytest.raises(ValueError, match="not LoRA factors"):
        AutoModelForCausalLM.from_pretrained(str(adapter_dir), local_files_only=True)
    state = load_file(adapter_dir / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="not LoRA factors"):
        base.load_adapter(adapter_state_dict=state, peft_config=SharedMoeLoraConfig(**{
            k: v for k, v in config.items() if k in ("r", "lora_alpha", "target_modules", "shared_outer")
        }))
    assert_unchanged(base, before)


def test_peft_type_is_enum_like(saved):
    from peft import PeftConfig

    from peft_shared_moe.config import PEFT_TYPE

    loaded = PeftConfig.from_pretrained(str(saved[0]))
    assert isinstance(loaded, SharedMoeLoraConfig)
    assert loaded.peft_type == "SHARED_MOE_LORA" and loaded.peft_type.value == "SHARED_MOE_LORA"
    assert PEFT_TYPE.value.lower() == "shared_moe_lora"


def test_saved_readme_says_how_to_load(saved):
    text = (saved[0] / "README.md").read_text()
    assert "import peft_shared_moe" in text


# ---- add_weighted_adapter -----------------------------------------------------------------------


def _deltas(model, adapter: str) -> dict:
    return {
        (name, p): d.double()
        for name, m in model.named_modules()
        if isinstance(m, SharedMoeLoraLayer) and adapter in m.scaling
        for p, d in m.delta_by_base_param(adapter).items()
    }


@pytest.mark.parametrize("shared_b", [True, False])
def test_add_weighted_adapter_cat_is_the_weighted_sum_of_deltas(qwen3_path, shared_b):
    model = get_peft_model(load(qwen3_path, dtype=torch.float64), config(r=4, lora_alpha=8), adapter_name="a")
    model.add_adapter("b", config(r=2, lora_alpha=3, use_rslora=True, shared_outer=shared_b))
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type="cat")
    assert model.peft_config["ab"].r == 6 and model.peft_config["ab"].shared_outer == shared_b
    da, db, dab = _deltas(model, "a"), _deltas(model, "b"), _deltas(model, "ab")
    assert dab.keys() == da.keys()
    for key in dab:
        torch.testing.assert_close(dab[key], 0.7 * da[key] - 0.4 * db[key], rtol=1e-10, atol=1e-12)
    # unit weights: the new adapter is exactly the two adapters active together
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "sum")
    model.base_model.set_adapter(["a", "b"])
    both = logits(model)
    model.base_model.set_adapter("sum")
    torch.testing.assert_close(logits(model), both, rtol=1e-10, atol=1e-10)


def test_add_weighted_adapter_linear_follows_peft(qwen3_path):
    model = get_peft_model(load(qwen3_path, dtype=torch.float64), config(r=4, lora_alpha=8), adapter_name="a")
    model.add_adapter("b", config(r=4, lora_alpha=2))
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    model.add_weighted_adapter(["a", "b"], [0.5, 2.0], "lin", combination_type="linear")
    layer = next(m for m in model.modules() if isinstance(m, ExpertsLoraLayer))
    ca, cb = (0.5 * 2.0) ** 0.5, (2.0 * 0.5) ** 0.5  # sqrt(weight * scaling), scalings 8/4 and 2/4
    for name, param in layer.factor_params("lin").items():
        want = ca * layer.factor_params("a")[name] + cb * layer.factor_params("b")[name]
        torch.testing.assert_close(param, want, rtol=1e-12, atol=1e-12)
    assert layer.scaling["lin"] == 1.0
    with pytest.raises(ValueError, match="one rank"):
        model.add_adapter("c", config(r=2))
        model.add_weighted_adapter(["a", "c"], [1.0, 1.0], "bad", combination_type="linear")


def test_add_weighted_adapter_refuses_other_types(qwen3_path):
    model = get_peft_model(load(qwen3_path), config(), adapter_name="a")
    with pytest.raises(NotImplementedError, match="'cat', 'linear'"):
        model.add_weighted_adapter(["a"], [1.0], "svd", combination_type="svd")
    assert "svd" not in model.peft_config


# ---- what PEFT's tuners guarantee -----------------------------------------------------------------


def test_autocast_adapter_dtype(qwen3_path):
    factors = lambda m: [p for n, p in m.named_parameters() if ".lora_" in n]  # noqa: E731
    kept = get_peft_model(load(qwen3_path, dtype=torch.bfloat16), config(), autocast_adapter_dtype=False)
    assert {p.dtype for p in factors(kept)} == {torch.bfloat16}
    upcast = get_peft_model(load(qwen3_path, dtype=torch.bfloat16), config())
    assert {p.dtype for p in factors(upcast)} == {torch.float32}


def test_layers_expose_in_and_out_features(qwen3_path):
    model = get_peft_model(load(qwen3_path), config())
    experts = next(m for m in model.modules() if isinstance(m, ExpertsLoraLayer))
    q_proj = next(m for m in model.modules() if isinstance(m, LinearLoraLayer))
    assert (experts.in_features, experts.out_features) == (32, 32)
    assert (q_proj.in_features, q_proj.out_features) == (q_proj.get_base_layer().in_features, q_proj.get_base_layer().out_features)


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_bias_modes(tmp_path, bias):
    path = save_random_model(qwen3_moe_config(attention_bias=True), tmp_path / "base")
    model = get_peft_model(load(path), config(target_modules=["q_proj", "experts"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    q_bias = {n for n, _ in model.named_parameters() if n.endswith("q_proj.base_layer.bias")}
    all_bias = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert trainable == {"none": set(), "lora_only": q_bias, "all": all_bias}[bias]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in trainable:
                p.add_(1.0)
    want = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = {k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors") if k.endswith(".bias")}
    assert len(saved) == len(trainable)
    reloaded = PeftModel.from_pretrained(load(path), tmp_path / "adapter")
    assert torch.equal(logits(reloaded), want)


def test_lm_head_target_is_refused(qwen3_path):
    base = load(qwen3_path)
    before = snapshot(base)
    with pytest.raises(ValueError, match="lm_head"):
        get_peft_model(base, config(target_modules=["experts", "lm_head"]))
    assert_unchanged(base, before)


# ---- multi-process training -------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_factor_gradients_have_their_parameters_strides(qwen3_path, shared):
    """DDP buckets assume grad strides == param strides ("Grad strides do not match bucket view
    strides" otherwise); a parameter concatenated with another on the hot path breaks it."""
    model = get_peft_model(load(qwen3_path), config(shared_outer=shared, init_lora_weights=False))
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    factors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert factors and all(p.grad is not None for p in factors.values())
    assert {n: p.grad.stride() for n, p in factors.items()} == {n: p.stride() for n, p in factors.items()}


def test_ddp_on_two_cpu_processes_without_stride_warnings(qwen3_path, tmp_path):
    """Two gloo processes launched by torchrun, as users launch DDP; a clean environment each."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import socket

    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(port),
               str(root / "tests" / "ddp_worker.py"), qwen3_path, str(tmp_path)]
    # loopback only: gloo would otherwise pick the interface the host name resolves to
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        assert not [w for w in result["warnings"] if "stride" in w.lower()]
    # the all-reduced gradients agree across ranks, and every factor got one
    assert ranks[0]["grads"].keys() == ranks[1]["grads"].keys() and len(ranks[0]["grads"]) > 6
    for name, grad in ranks[0]["grads"].items():
        torch.testing.assert_close(grad, ranks[1]["grads"][name], rtol=0, atol=0, msg=name)
