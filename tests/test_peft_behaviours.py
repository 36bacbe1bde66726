"""PEFT's generic tuner behaviours, held for ours, on a small MLP and a tiny Qwen3-MoE.

Written from what PEFT's own LoRA does (its tests/test_custom_models.py covers the same ground for
its tuners): save / load round trips (selected adapters, names that are substrings of others,
low_cpu_mem_usage, modules_to_save, "all-linear"), which parameters train after loading, a refused
load leaving every adapter as it was, NaN refused on load, and the mixed-batch errors PEFT raises.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peft_shared_moe import SharedMoeLoraConfig, export_adapter
from peft_shared_moe.tuners import ExpertsLoraLayer, LinearLoraLayer
from tests.conftest import input_ids, load, randomize_adapter


class MLP(nn.Module):
    """PEFT's test toy: two linears and a head, no transformers involved."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(10, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().double()


MLP_INPUT = torch.randn(5, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def run(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(MLP_INPUT) if kind == "mlp" else model(input_ids=input_ids()).logits


@pytest.fixture(params=["mlp", "qwen3_moe"])
def case(request, qwen3_path):
    """(kind, base model factory, config factory) for each toy."""
    if request.param == "mlp":
        return "mlp", mlp, lambda **kw: SharedMoeLoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], **kw)
    return "qwen3_moe", lambda: load(qwen3_path), lambda **kw: SharedMoeLoraConfig(r=4, lora_alpha=8, **kw)


def trained(model, names=("default",), seed: int = 0):
    for i, name in enumerate(names):
        randomize_adapter(model, name, seed=seed + i)
    return model


# ---- save / load round trips -------------------------------------------------------------------


def test_selected_adapters_and_substring_names_round_trip(case, tmp_path):
    kind, base, config = case
    model = get_peft_model(base(), config(), adapter_name="a")
    model.add_adapter("ab", config())  # "a" is a substring of "ab": keys must not mix
    trained(model, ("a", "ab"))
    want = {}
    for name in ("a", "ab"):
        model.set_adapter(name)
        want[name] = run(model, kind)
    assert not torch.equal(want["a"], want["ab"])
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    assert not (tmp_path / "a").exists() and (tmp_path / "ab" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(base(), tmp_path / "ab", adapter_name="ab")
    assert torch.equal(run(reloaded, kind), want["ab"])
    model.save_pretrained(tmp_path / "both")
    reloaded.load_adapter(tmp_path / "both" / "a", adapter_name="a")  # PEFT saves a non-default name in a subfolder
    reloaded.set_adapter("a")
    assert torch.equal(run(reloaded, kind), want["a"])


def test_low_cpu_mem_usage_load_equals_plain_load(case, tmp_path):
    kind, base, config = case
    model = trained(get_peft_model(base(), config()))
    model.save_pretrained(tmp_path)
    want = run(model, kind)
    fast = PeftModel.from_pretrained(base(), tmp_path, low_cpu_mem_usage=True)
    assert all(p.device.type != "meta" for p in fast.parameters())
    assert torch.equal(run(fast, kind), want)
    fast.load_adapter(tmp_path, adapter_name="second", low_cpu_mem_usage=True)
    fast.set_adapter("second")
    assert torch.equal(run(fast, kind), want)


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_default_targets_round_trip_and_stay_as_given(qwen3_path, mixtral_path, tmp_path, targets):
    """PEFT expands "all-linear" into every linear's path, which dropped "experts" from the saved config."""
    for path in (qwen3_path, mixtral_path):
        model = trained(get_peft_model(load(path), SharedMoeLoraConfig(r=4, target_modules=targets)))
        kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (ExpertsLoraLayer, LinearLoraLayer))}
        assert kinds == {"ExpertsLoraLayer", "LinearLoraLayer"}
        adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LinearLoraLayer)}
        assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}  # not the dense MLP, the router or lm_head
        assert model.peft_config["default"].target_modules == targets
        model.save_pretrained(tmp_path / "a")
        assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == targets
        reloaded = PeftModel.from_pretrained(load(path), tmp_path / "a")
        assert torch.equal(run(reloaded, "lm"), run(model, "lm"))


def test_modules_to_save_round_trips_every_way(qwen3_path, tmp_path):
    """PEFT saves a modules_to_save copy under the module's own key (`lm_head.weight`); the strict check
    takes it for this adapter's tensor, and still refuses a base weight."""
    model = trained(get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4, modules_to_save=["lm_head"])))
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(torch.randn(head.modules_to_save["default"].weight.shape))
    want = run(model, "lm")
    model.save_pretrained(tmp_path / "a")
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")

    peft_loaded = PeftModel.from_pretrained(load(qwen3_path), tmp_path / "a", is_trainable=True)
    assert torch.equal(run(peft_loaded, "lm"), want)
    trainable = {n for n, p in peft_loaded.named_parameters() if p.requires_grad}
    assert "base_model.model.lm_head.modules_to_save.default.weight" in trainable
    assert not any("original_module" in n for n in trainable)
    frozen = PeftModel.from_pretrained(load(qwen3_path), tmp_path / "a")
    assert not any(p.requires_grad for p in frozen.parameters())

    native = load(qwen3_path)
    if "adapter_state_dict_load_map" in inspect.getsource(type(native).load_adapter.__wrapped__):
        native.load_adapter(str(tmp_path / "a"))
        torch.testing.assert_close(run(native, "lm"), want, rtol=1e-5, atol=1e-5)  # the same tensors, float32 rounding
    else:  # transformers 5.17 loads a module copy into nothing: refused, never silently the base's lm_head
        modules_before = [(n, type(m).__name__) for n, m in native.named_modules()]
        with pytest.raises(ValueError, match="was not loaded by this transformers"):
            native.load_adapter(str(tmp_path / "a"))
        assert [(n, type(m).__name__) for n, m in native.named_modules()] == modules_before

    # the serving formats hold LoRA factors only: convert refuses the copy by name and writes nothing
    with pytest.raises(ValueError, match="modules_to_save.*full module copies cannot be converted"):
        export_adapter(tmp_path / "a", tmp_path / "sglang", format="sglang")
    assert not (tmp_path / "sglang").exists()

    # a second adapter with its own copy, then one name per sample
    peft_loaded.eval()
    peft_loaded.load_adapter(tmp_path / "a", adapter_name="again")
    base_logits = run(load(qwen3_path), "lm")
    with torch.no_grad():
        mixed = peft_loaded(input_ids=input_ids(), adapter_names=["again", "__base__"]).logits
    torch.testing.assert_close(mixed[0], want[0], rtol=1e-4, atol=1e-4)  # grouped per adapter: float32 rounding
    torch.testing.assert_close(mixed[1], base_logits[1], rtol=1e-4, atol=1e-4)


def test_modules_to_save_key_still_refuses_base_weights(qwen3_path, tmp_path):
    model = get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4, modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.weight"] = torch.zeros(32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = load(qwen3_path)
    norm = base.model.norm.weight.detach().clone()
    with pytest.raises(ValueError, match="model.norm.weight"):
        PeftModel.from_pretrained(base, tmp_path)
    with pytest.raises(ValueError, match="model.norm.weight"):
        base.load_adapter(str(tmp_path))
    assert torch.equal(base.model.norm.weight, norm) and not hasattr(base.model.layers[0].mlp.experts, "base_layer")


# ---- a refused load changes nothing ------------------------------------------------------------


def test_refused_load_into_an_existing_adapter_name_keeps_it(qwen3_path, tmp_path):
    """Loading a per-expert adapter into a shared-outer adapter of the same name is refused; the
    existing adapter (config, factors, output) stays exactly as it was."""
    model = trained(get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4)), ("default",))
    per_expert = get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4, shared_outer=False))
    per_expert.save_pretrained(tmp_path)
    want = run(model, "lm")
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="expected shape"):
        model.load_adapter(tmp_path, adapter_name="default")
    assert list(model.peft_config) == ["default"] and model.peft_config["default"].shared_outer
    assert all(torch.equal(p, factors[n]) for n, p in model.named_parameters() if "lora_" in n)
    assert torch.equal(run(model, "lm"), want)


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter", "transformers"])
def test_nan_is_refused_on_load_naming_folder_and_key(qwen3_path, tmp_path, how):
    model = trained(get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4)))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.2.mlp.experts.w2.lora_B.weight"
    tensors[key][0, 3, 1] = float("nan")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = load(qwen3_path)
    target = get_peft_model(base, SharedMoeLoraConfig(r=4), adapter_name="kept") if how == "load_adapter" else base
    modules_before = [(n, type(m).__name__) for n, m in target.named_modules()]
    with pytest.raises(ValueError, match="NaN") as info:
        if how == "from_pretrained":
            PeftModel.from_pretrained(target, tmp_path)
        elif how == "load_adapter":
            target.load_adapter(tmp_path, adapter_name="other")
        else:
            target.load_adapter(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "layers.2.mlp.experts.w2.lora_B" in str(info.value)
    assert [(n, type(m).__name__) for n, m in target.named_modules()] == modules_before
    if how == "transformers":  # nor does transformers' bookkeeping say an adapter is loaded
        assert not getattr(target, "_hf_peft_config_loaded", False) and not getattr(target, "peft_config", {})


# ---- run-time settings are not saved ------------------------------------------------------------


def test_backend_is_not_bound_by_the_saved_config(qwen3_path, tmp_path):
    model = get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4, backend="loop"))
    model.save_pretrained(tmp_path)
    assert "backend" not in json.loads((tmp_path / "adapter_config.json").read_text())
    layer = lambda m: next(x for x in m.modules() if isinstance(x, ExpertsLoraLayer))  # noqa: E731
    assert layer(PeftModel.from_pretrained(load(qwen3_path), tmp_path)).backend["default"] == "auto"
    chosen = SharedMoeLoraConfig.from_pretrained(str(tmp_path), backend="torch")
    assert layer(PeftModel.from_pretrained(load(qwen3_path), tmp_path, config=chosen)).backend["default"] == "torch"
    # an adapter written by an earlier version, with the backend in its config: the reload still runs "auto"
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "backend": "loop"}))
    assert layer(PeftModel.from_pretrained(load(qwen3_path), tmp_path)).backend["default"] == "auto"
    native = load(qwen3_path)  # transformers' own loader reads the config through PEFT's base class
    native.load_adapter(str(tmp_path))
    assert layer(native).backend["default"] == "auto" and native.peft_config["default"].backend == "auto"


# ---- mixed batches: PEFT's errors ----------------------------------------------------------------


def _mixed_error(model, adapter_names, train: bool = False):
    model.train(train)
    try:
        with torch.no_grad():
            model(input_ids=input_ids(), adapter_names=adapter_names)
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error)
    return None


@pytest.mark.parametrize("adapter_names, train", [
    (["default", "default"], True),  # training
    (["default"], False),  # one name for two samples
    (["default", "nope"], False),  # an unknown name
])
def test_mixed_batch_errors_are_peft_loras(qwen3_path, adapter_names, train):
    ours = get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4, target_modules=["q_proj", "experts"]))
    theirs = get_peft_model(load(qwen3_path), LoraConfig(r=4, target_modules=["q_proj"]))
    expected = _mixed_error(theirs, adapter_names, train)
    assert expected is not None
    assert _mixed_error(ours, adapter_names, train) is expected


# ---- PEFT 0.22's tuner contract ----------------------------------------------------------------


def test_layers_to_transform_selects_decoder_layers(qwen3_path):
    for pattern in (None, "layers"):
        model = get_peft_model(load(qwen3_path), SharedMoeLoraConfig(
            r=4, target_modules=["experts", "q_proj"], layers_to_transform=[2], layers_pattern=pattern))
        adapted = sorted(n for n, m in model.named_modules() if isinstance(m, (ExpertsLoraLayer, LinearLoraLayer)))
        assert adapted == ["base_model.model.model.layers.2.mlp.experts", "base_model.model.model.layers.2.self_attn.q_proj"]
    with pytest.raises(ValueError, match="in the layers layers_to_transform=1 selects has no fused experts"):  # dense
        get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4, target_modules=["experts"], layers_to_transform=1))
    with pytest.raises(ValueError, match="cannot be used when .?target_modules.? is a str"):  # PEFT 0.22 says it first
        SharedMoeLoraConfig(target_modules="all-linear", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern.*repeats a group"):
        SharedMoeLoraConfig(target_modules=["experts"], layers_to_transform=[0], layers_pattern="(a+)+")
    with pytest.raises(ValueError, match="layers_to_transform must be"):
        SharedMoeLoraConfig(target_modules=["experts"], layers_to_transform=[-1])


def test_gaussian_init_and_refused_inits(qwen3_path):
    model = get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4, init_lora_weights="gaussian"))
    a_factors = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert all(p.abs().sum() > 0 for p in a_factors)
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_B" in n)  # the identity
    std = torch.cat([p.flatten() for p in a_factors]).std().item()
    assert abs(std - 1 / 4) < 0.02  # N(0, 1/r), as PEFT's LoRA
    for init in ("pissa", "olora", "loftq", "eva", "corda", "orthogonal", "nora"):
        with pytest.raises(ValueError, match="init_lora_weights must be one of"):
            SharedMoeLoraConfig(init_lora_weights=init)


@pytest.mark.skipif(not hasattr(LinearLoraLayer, "get_additive_delta"), reason="PEFT >= 0.22")
def test_get_additive_delta(qwen3_path):
    model = trained(get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4)))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    before = q_proj.get_base_layer().weight.detach().clone()
    delta = q_proj.get_additive_delta("default")
    model.merge_adapter()
    torch.testing.assert_close(before + delta, q_proj.get_base_layer().weight, rtol=0, atol=1e-6)
    model.unmerge_adapter()
    with pytest.raises(NotImplementedError, match="two base weights"):
        model.base_model.model.model.layers[0].mlp.experts.get_additive_delta("default")


@pytest.mark.skipif(not hasattr(LinearLoraLayer, "set_training"), reason="PEFT >= 0.22")
def test_set_training_reaches_every_adapter_module(qwen3_path):
    model = get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4, lora_dropout=0.1))
    layers = [m for m in model.modules() if isinstance(m, (ExpertsLoraLayer, LinearLoraLayer))]
    for training in (False, True):
        for layer in layers:
            layer.set_training("default", training)
        dropouts = [m.lora_dropout["default"] for m in layers if isinstance(m, LinearLoraLayer)]
        assert dropouts and all(d.training is training for d in dropouts)
        factors = [m.factor_dict("w1.lora_A")["default"] for m in layers if isinstance(m, ExpertsLoraLayer)]
        assert factors and all(f.training is training for f in factors)


@pytest.mark.skipif("strict_adapter_check" not in inspect.signature(PeftModel.load_adapter.__wrapped__).parameters,
                    reason="PEFT >= 0.22")
@pytest.mark.parametrize("strictness", ["ignore", "warn", "error"])
def test_strict_adapter_check_never_lets_a_base_weight_in(qwen3_path, tmp_path, strictness):
    """PEFT's strict_adapter_check reports keys after loading; ours refuses them before, whatever it says."""
    model = get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(64, 32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight"):
        model.load_adapter(tmp_path, adapter_name="other", strict_adapter_check=strictness)
    assert "other" not in model.peft_config


def test_device_map_placement_and_offloaded_layers(qwen3_path, tmp_path):
    """A model placed by accelerate: factors are made on their layer's device; a layer offloaded to disk
    (its weights on the meta device until its forward) is refused by name, and nothing is wrapped."""
    placed = load(qwen3_path, device_map={"": "cpu"})
    model = trained(get_peft_model(placed, SharedMoeLoraConfig(r=4)))
    assert all(p.device.type == "cpu" for n, p in model.named_parameters() if "lora_" in n)
    model.save_pretrained(tmp_path / "a")
    torch.testing.assert_close(run(PeftModel.from_pretrained(load(qwen3_path), tmp_path / "a"), "lm"), run(model, "lm"),
                               rtol=0, atol=0)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "cpu", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded = load(qwen3_path, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    modules_before = [(n, type(m).__name__) for n, m in offloaded.named_modules()]
    with pytest.raises(ValueError, match=r"layers\.2\..*offloaded"):
        get_peft_model(offloaded, SharedMoeLoraConfig(r=4))
    assert [(n, type(m).__name__) for n, m in offloaded.named_modules()] == modules_before


def test_other_peft_types_load_through_the_guards_unchanged(qwen3_path, tmp_path):
    """The loading guards wrap PEFT's and transformers' entry points for every adapter type; PEFT's own
    LoRA must load as before."""
    lora = get_peft_model(load(qwen3_path), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path)
    want = run(lora, "lm")
    reloaded = PeftModel.from_pretrained(load(qwen3_path), tmp_path)
    reloaded.load_adapter(tmp_path, adapter_name="second")
    assert torch.equal(run(reloaded, "lm"), want)
    native = load(qwen3_path)
    native.load_adapter(str(tmp_path))
    torch.testing.assert_close(run(native, "lm"), want, rtol=1e-5, atol=1e-5)
