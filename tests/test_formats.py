"""Serving formats: exact round trips, every accepted input layout, detection, validation, safety, TP shards.

Inputs in other layouts are built here from a native adapter's tensors with plain torch (not with
the library), and every comparison is exact (`torch.equal`) unless floating-point math is involved.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_shared_moe import SharedMoeLoraConfig, export_adapter, import_adapter, inspect_adapter, shard_adapter
from tests.conftest import SavedAdapter, load, model_logits, qwen3_moe_config, randomize_adapter
from tests.reference import naive_moe_lora

E, H, I, R = 6, 32, 16, 4  # the tiny Qwen3-MoE of conftest (layer 1 is dense)
MOE_LAYERS = (0, 2)
SCALING = 8 / R**0.5  # lora_alpha 8, use_rslora
ATTENTION_OUT = {"q_proj": 32, "k_proj": 16, "v_proj": 16, "o_proj": 32}
EXPERTS = "base_model.model.model.layers.{}.mlp.experts"
PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_NATIVE_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(w[123])\.(lora_[AB])\.weight$")


# ---- fixtures and hand-made layouts ---------------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["shared", "per_expert"])
def native(request, qwen3_path, tmp_path_factory) -> SavedAdapter:
    model = get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=R, lora_alpha=8, use_rslora=True, shared_outer=request.param))
    randomize_adapter(model, seed=11)
    path = tmp_path_factory.mktemp("native") / "adapter"
    model.save_pretrained(path)
    return SavedAdapter(path, model_logits(model))


def lora_config(**overrides) -> dict:
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 8, "use_rslora": True, "task_type": "CAUSAL_LM",
              "target_modules": ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"]}
    config.update(overrides)
    return config


def save_adapter(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.clone() for k, v in tensors.items()}, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def per_expert(tensors: dict, names: dict = PROJ) -> dict:
    """Native 3D -> experts.{e}.<name>.lora_X.weight 2D, shared factors copied to every expert."""
    out = {}
    for key, value in tensors.items():
        match = _NATIVE_EXPERT_KEY.match(key)
        if not match:
            out[key] = value
            continue
        module, proj, ab = match.groups()
        for e in range(E):
            out[f"{module}.{e}.{names[proj]}.{ab}.weight"] = value[e if value.shape[0] > 1 else 0].clone()
    return out


def renamed(tensors: dict) -> dict:
    """Native 3D with w1/w3/w2 -> the same tensors named gate_proj/up_proj/down_proj."""
    return {re.sub(r"\.experts\.(w[123])\.", lambda m: f".experts.{PROJ[m[1]]}.", k): v for k, v in tensors.items()}


def fused(tensors: dict, single_a: bool = False) -> dict:
    """Native 3D -> SGLang's fused gate_up_proj: A [.., 2r, H] (or one shared A [.., r, H]), B [E, 2I, r]."""
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in MOE_LAYERS:
        p = EXPERTS.format(layer)
        gate_a, up_a = tensors[f"{p}.w1.lora_A.weight"], tensors[f"{p}.w3.lora_A.weight"]
        out[f"{p}.gate_up_proj.lora_A.weight"] = gate_a if single_a else torch.cat([gate_a, up_a], dim=1)
        out[f"{p}.gate_up_proj.lora_B.weight"] = torch.cat([tensors[f"{p}.w1.lora_B.weight"], tensors[f"{p}.w3.lora_B.weight"]], dim=1)
        for ab in ("lora_A", "lora_B"):
            out[f"{p}.down_proj.{ab}.weight"] = tensors[f"{p}.w2.{ab}.weight"]
    return out


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def leftovers(parent: Path) -> list[str]:
    """Temporary directories a failed write left beside its destination."""
    return [name for name in os.listdir(parent) if name.startswith(".")] if parent.exists() else []


# ---- exports and round trips ----------------------------------------------------------------


def test_sglang_export_is_a_plain_lora_adapter_and_round_trips(native, tmp_path):
    sglang = export_adapter(native.path, tmp_path / "sglang", format="sglang")
    config = json.loads((sglang / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (config["r"], config["lora_alpha"], config["use_rslora"]) == (R, 8, True)
    assert set(config["target_modules"]) == {"gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"}
    assert isinstance(LoraConfig.from_pretrained(str(sglang)), LoraConfig)
    assert_same_tensors(load_file(sglang / "adapter_model.safetensors"), native.tensors)  # same keys and layout

    back = import_adapter(sglang, tmp_path / "native")
    assert_same_tensors(load_file(back / "adapter_model.safetensors"), native.tensors)
    kept = ("peft_type", "r", "lora_alpha", "use_rslora", "shared_outer")
    assert {k: json.loads((back / "adapter_config.json").read_text())[k] for k in kept} == {k: native.config[k] for k in kept}


def test_vllm_export_copies_shared_factors_per_expert_and_round_trips(native, tmp_path):
    vllm = export_adapter(native.path, tmp_path / "vllm", format="vllm")
    got = load_file(vllm / "adapter_model.safetensors")
    want = {}
    for key, value in native.tensors.items():
        match = _NATIVE_EXPERT_KEY.match(key)
        if not match:
            want[key] = value
            continue
        for e in range(E):  # written out by hand: a shared factor's one copy, or expert e's own
            want[f"{match[1]}.{e}.{PROJ[match[2]]}.{match[3]}.weight"] = value[0] if value.shape[0] == 1 else value[e]
    assert_same_tensors(got, want)
    assert len(got) == len(MOE_LAYERS) * 6 * E + 3 * 4 * 2
    assert json.loads((vllm / "adapter_config.json").read_text())["peft_type"] == "LORA"

    back = import_adapter(vllm, tmp_path / "native")
    assert_same_tensors(load_file(back / "adapter_model.safetensors"), native.tensors)
    assert json.loads((back / "adapter_config.json").read_text())["shared_outer"] == native.config["shared_outer"]


def test_tinker_is_the_sglang_layout(shared_native, tmp_path):
    tinker = export_adapter(shared_native.path, tmp_path / "tinker", format="tinker")
    sglang = export_adapter(shared_native.path, tmp_path / "sglang", format="sglang")
    assert (tinker / "adapter_model.safetensors").read_bytes() == (sglang / "adapter_model.safetensors").read_bytes()
    assert (tinker / "adapter_config.json").read_text() == (sglang / "adapter_config.json").read_text()


def test_sglang_export_warns_only_for_a_per_expert_adapter(native, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_adapter(native.path, tmp_path / "sglang")
    warned = [w for w in caught if "format='vllm'" in str(w.message)]
    assert bool(warned) == (not native.config["shared_outer"])


# ---- import: every accepted layout ------------------------------------------------------------


def _variant(name: str, tensors: dict) -> tuple[dict, dict]:
    """(input tensors, the native tensors import must produce) for one input layout."""
    if name == "3d-gate_up_down-names":
        return renamed(tensors), tensors
    if name == "fused-gate_up":
        return fused(tensors), tensors
    if name == "fused-single-A":  # one A serves gate and up
        want = dict(tensors)
        for layer in MOE_LAYERS:
            want[f"{EXPERTS.format(layer)}.w3.lora_A.weight"] = tensors[f"{EXPERTS.format(layer)}.w1.lora_A.weight"]
        return fused(tensors, single_a=True), want
    if name == "per-expert-w-names":
        return per_expert(tensors, {"w1": "w1", "w3": "w3", "w2": "w2"}), tensors
    if name == "no-prefix":
        return {k.removeprefix("base_model.model."): v for k, v in tensors.items()}, tensors
    if name in ("bfloat16", "float16"):
        cast = {k: v.to(getattr(torch, name)) for k, v in tensors.items()}
        return per_expert(cast), cast
    raise AssertionError(name)


VARIANTS = ["3d-gate_up_down-names", "fused-gate_up", "fused-single-A", "per-expert-w-names", "no-prefix", "bfloat16", "float16"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_accepts_layout(native, tmp_path, variant, qwen3_path):
    given, want = _variant(variant, native.tensors)
    src = save_adapter(tmp_path / "in", given, lora_config())
    out = import_adapter(src, tmp_path / "out", base=qwen3_path)
    assert_same_tensors(load_file(out / "adapter_model.safetensors"), want)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHARED_MOE_LORA" and config["shared_outer"] == native.config["shared_outer"]
    assert config["target_modules"] == ["experts", "k_proj", "o_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("variant", ["vllm", "fused-gate_up"])
def test_imported_adapter_gives_the_samemodel_logits(native, qwen3_path, tmp_path, variant):
    given = per_expert(native.tensors) if variant == "vllm" else fused(native.tensors)
    src = save_adapter(tmp_path / "in", given, lora_config())
    model = PeftModel.from_pretrained(load(qwen3_path), import_adapter(src, tmp_path / "native"))
    assert torch.equal(model_logits(model), native.logits)


def test_identical_per_expert_copies_are_stored_shared_unless_one_differs_anywhere(shared_native, tmp_path):
    given = per_expert(shared_native.tensors)
    out = import_adapter(save_adapter(tmp_path / "same", given, lora_config()), tmp_path / "same_out")
    assert json.loads((out / "adapter_config.json").read_text())["shared_outer"] is True
    assert_same_tensors(load_file(out / "adapter_model.safetensors"), shared_native.tensors)

    # one expert's copy of one factor differs, in the last MoE layer: detection must look there too
    last = f"{EXPERTS.format(MOE_LAYERS[-1])}.{E - 1}.down_proj.lora_B.weight"
    given[last] = given[last].clone()
    given[last][0, 0] += 1e-6
    out = import_adapter(save_adapter(tmp_path / "differs", given, lora_config()), tmp_path / "differs_out")
    assert json.loads((out / "adapter_config.json").read_text())["shared_outer"] is False
    got = load_file(out / "adapter_model.safetensors")
    assert got[f"{EXPERTS.format(2)}.w2.lora_B.weight"].shape == (E, H, R)
    assert torch.equal(got[f"{EXPERTS.format(2)}.w2.lora_B.weight"][E - 1], given[last])
    assert torch.equal(got[f"{EXPERTS.format(0)}.w1.lora_A.weight"][3], given[f"{EXPERTS.format(0)}.3.gate_proj.lora_A.weight"])

    with pytest.raises(ValueError, match=re.escape(last) + ".*differs from expert 0"):
        import_adapter(tmp_path / "differs", tmp_path / "forced", shared_outer=True)
    assert not (tmp_path / "forced").exists() and not leftovers(tmp_path)


def test_shared_outer_false_copies_shared_factors_to_every_expert(shared_native, qwen3_path, tmp_path):
    out = import_adapter(shared_native.path, tmp_path / "per_expert", shared_outer=False)
    got = load_file(out / "adapter_model.safetensors")
    for key, value in shared_native.tensors.items():
        want = value.expand(E, *value.shape[1:]) if ".experts." in key else value
        assert torch.equal(got[key], want), key
    model = PeftModel.from_pretrained(load(qwen3_path), out)
    torch.testing.assert_close(model_logits(model), shared_native.logits, rtol=1e-5, atol=1e-5)


def test_mixed_layouts_name_the_first_conflicting_tensor(shared_native, tmp_path):
    tensors = shared_native.tensors
    layer2 = {k: v for k, v in tensors.items() if ".layers.2.mlp" in k}
    rest = {k: v for k, v in tensors.items() if k not in layer2}
    cases = {
        "3d+per-expert": ({**rest, **per_expert(layer2)}, f"{EXPERTS.format(2)}.0.down_proj.lora_A.weight"),
        "w-names+proj-names": ({**rest, **renamed(layer2)}, f"{EXPERTS.format(2)}.down_proj.lora_A.weight"),
        "shared+per-expert": (
            {**tensors, f"{EXPERTS.format(2)}.w1.lora_A.weight": torch.randn(E, R, H),
             f"{EXPERTS.format(2)}.w3.lora_A.weight": torch.randn(E, R, H), f"{EXPERTS.format(2)}.w2.lora_B.weight": torch.randn(E, H, R)},
            f"{EXPERTS.format(2)}.w1.lora_A.weight",
        ),
    }
    for name, (given, first_conflict) in cases.items():
        src = save_adapter(tmp_path / name, given, lora_config())
        with pytest.raises(ValueError, match="mixed layouts") as err:
            import_adapter(src, tmp_path / f"{name}_out")
        assert re.search(re.escape(first_conflict) + r"\b", str(err.value)), (name, str(err.value))
        assert not (tmp_path / f"{name}_out").exists()


def test_attention_only_adapter(shared_native, qwen3_path, tmp_path):
    dense = {k: v for k, v in shared_native.tensors.items() if ".experts." not in k}
    src = save_adapter(tmp_path / "in", dense, lora_config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    info = inspect_adapter(src)
    assert (info.layout, info.num_experts, info.shared_outer, info.moe_layers) == ("dense", None, None, [])
    out = import_adapter(src, tmp_path / "out", base=qwen3_path)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    model = PeftModel.from_pretrained(load(qwen3_path), out)
    assert_same_tensors(load_file(out / "adapter_model.safetensors"), dense)
    assert (model_logits(model) - model_logits(load(qwen3_path))).abs().max() > 1e-3


def test_bad_arguments(shared_native, tmp_path):
    with pytest.raises(ValueError, match="export format must be one of"):
        export_adapter(shared_native.path, tmp_path / "x", format="native")
    with pytest.raises(ValueError, match="shared_outer must be None"):
        import_adapter(shared_native.path, tmp_path / "x", shared_outer="yes")
    with pytest.raises(ValueError, match="tp_size must be a positive integer"):
        shard_adapter(shared_native.path, tmp_path / "x", 0)
    assert not (tmp_path / "x").exists()


# ---- validation: nothing written on bad input -----------------------------------------------


def _refused(src: Path, dst: Path, match: str, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as err:
        import_adapter(src, dst, **kwargs)
    assert not dst.exists() and not leftovers(dst.parent)
    return str(err.value)


@pytest.mark.parametrize("base_kind", ["config.json", "model dir", "PretrainedConfig"])
@pytest.mark.parametrize(
    "other, bad_key, expected",
    [
        (dict(num_experts=8), "w1.lora_B", "[8, 16, 4]"),
        (dict(moe_intermediate_size=24), "w1.lora_B", "[6, 24, 4]"),
        (dict(hidden_size=48, head_dim=12), "w1.lora_A", "[1, 4, 48] or [6, 4, 48]"),
    ],
)
def test_shapes_are_checked_against_the_base(shared_native, tmp_path, other, bad_key, expected, base_kind):
    config = qwen3_moe_config(**other)
    if base_kind == "PretrainedConfig":
        base = config
    else:
        config.save_pretrained(tmp_path / "base")
        base = tmp_path / "base" / ("config.json" if base_kind == "config.json" else "")
    message = _refused(shared_native.path, tmp_path / "out" / "adapter", r"shapes do not fit the base model", base=base)
    assert f"layers.0.mlp.experts.{bad_key}.weight: expected shape {expected}" in message


def test_layer_count_and_missing_modules_against_the_base(shared_native, qwen3_path, tmp_path):
    tensors = shared_native.tensors
    extra = {k.replace(".layers.2.", ".layers.3."): v for k, v in tensors.items() if ".layers.2." in k}
    src = save_adapter(tmp_path / "extra", {**tensors, **extra}, lora_config())
    import_adapter(src, tmp_path / "no_base")  # without a base there is nothing to compare layers with
    message = _refused(src, tmp_path / "out", "do not match the base model", base=qwen3_path)
    assert "layers.3.mlp.experts.*: the base model has no such module" in message

    fewer = {k: v for k, v in tensors.items() if ".layers.2.self_attn.q_proj" not in k}
    src = save_adapter(tmp_path / "fewer", fewer, lora_config())
    message = _refused(src, tmp_path / "out", "do not match the base model", base=qwen3_path)
    assert "layers.2.self_attn.q_proj.lora_A.weight: missing" in message


def test_incomplete_and_unknown_keys_are_listed(shared_native, tmp_path):
    tensors = shared_native.tensors
    missing = {k: v for k, v in tensors.items() if not k.endswith("layers.0.mlp.experts.w2.lora_B.weight")}
    message = _refused(save_adapter(tmp_path / "missing", missing, lora_config()), tmp_path / "out", "incomplete")
    assert "missing base_model.model.model.layers.0.mlp.experts.w2.lora_B.weight" in message

    unknown = {**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.zeros(32)}
    message = _refused(save_adapter(tmp_path / "unknown", unknown, lora_config()), tmp_path / "out", "2 unknown tensor")
    assert "lm_head.weight" in message and "q_proj.lora_magnitude_vector" in message

    per = per_expert(tensors)
    del per[f"{EXPERTS.format(2)}.3.up_proj.lora_B.weight"]
    message = _refused(save_adapter(tmp_path / "hole", per, lora_config()), tmp_path / "out", "incomplete")
    assert "experts [3] missing" in message and "up_proj.lora_B" in message


def test_one_rank_per_adapter_or_a_declared_rank_pattern(shared_native, tmp_path):
    tensors = shared_native.tensors
    message = _refused(save_adapter(tmp_path / "r8", tensors, lora_config(r=8)), tmp_path / "out", "shapes do not fit")
    assert "w1.lora_A.weight: expected shape [1, 8, 32] or [6, 8, 32], found [1, 4, 32]" in message

    q = "base_model.model.model.layers.1.self_attn.q_proj"
    odd = {**tensors, f"{q}.lora_A.weight": torch.randn(2, H), f"{q}.lora_B.weight": torch.randn(32, 2)}
    message = _refused(save_adapter(tmp_path / "odd", odd, lora_config()), tmp_path / "out", "shapes do not fit")
    assert f"{q}.lora_A.weight: expected shape [4, *], found [2, 32]" in message

    declared = save_adapter(tmp_path / "pattern", odd, lora_config(rank_pattern={"model.layers.1.self_attn.q_proj": 2}))
    out = export_adapter(declared, tmp_path / "sglang", format="sglang")
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 2}
    _refused(declared, tmp_path / "native", "native format has one rank")


def test_nan_and_inf_are_refused_even_in_the_last_tensor(shared_native, tmp_path):
    tensors = dict(shared_native.tensors)
    last = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"  # the last tensor streamed
    tensors[last] = tensors[last].clone()
    tensors[last][3, 1] = float("nan")
    message = _refused(save_adapter(tmp_path / "nan", tensors, lora_config()), tmp_path / "out", "NaN/Inf")
    assert last in message

    per = per_expert(shared_native.tensors)
    key = f"{EXPERTS.format(2)}.4.gate_proj.lora_A.weight"
    per[key] = per[key].clone()
    per[key][0, 0] = float("inf")
    assert key in _refused(save_adapter(tmp_path / "inf", per, lora_config()), tmp_path / "out", "NaN/Inf")


@pytest.mark.parametrize(
    "field, value", [("peft_type", "IA3"), ("use_dora", True), ("bias", "all"), ("init_lora_weights", "pissa"), ("r", 0)]
)
def test_unsupported_configs_are_refused(shared_native, tmp_path, field, value):
    src = save_adapter(tmp_path / "in", shared_native.tensors, lora_config(**{field: value}))
    assert field in _refused(src, tmp_path / "out", "adapter_config.json")


def _bin_adapter(path: Path, payload) -> Path:
    path.mkdir()
    torch.save(payload, path / "adapter_model.bin")
    (path / "adapter_config.json").write_text(json.dumps(lora_config()))
    return path


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickles_are_refused_unless_opted_in_and_then_read_weights_only(shared_native, tmp_path):
    src = _bin_adapter(tmp_path / "bin", shared_native.tensors)
    assert "allow_pickle=True" in _refused(src, tmp_path / "out", "pickle")
    out = import_adapter(src, tmp_path / "out", allow_pickle=True)
    assert_same_tensors(load_file(out / "adapter_model.safetensors"), shared_native.tensors)

    marker = tmp_path / "code_ran"
    evil = _bin_adapter(tmp_path / "evil", {**shared_native.tensors, "x": _Exploit(marker)})
    with pytest.raises(ValueError, match="weights_only"):
        import_adapter(evil, tmp_path / "evil_out", allow_pickle=True)
    assert not marker.exists() and not (tmp_path / "evil_out").exists()


def test_destination_is_never_clobbered_without_overwrite(shared_native, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_adapter(shared_native.path, dst)
    assert os.listdir(dst) == ["keep.txt"]
    export_adapter(shared_native.path, dst, overwrite=True)
    assert sorted(os.listdir(dst)) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match="is the input"):
        import_adapter(shared_native.path, shared_native.path, overwrite=True)
    assert not leftovers(tmp_path) and not leftovers(shared_native.path.parent)


# ---- inspect ------------------------------------------------------------------------------------


def test_inspect_summarises_native_and_vllm(native, tmp_path, qwen3_path):
    info = inspect_adapter(native.path, base=qwen3_path)
    shared = native.config["shared_outer"]
    assert (info.format, info.layout, info.peft_type, info.r, info.lora_alpha, info.use_rslora) == (
        "native", "3d", "SHARED_MOE_LORA", R, 8, True
    )
    assert info.scaling == pytest.approx(SCALING)
    assert (info.num_experts, info.hidden_size, info.intermediate_size, info.shared_outer) == (E, H, I, shared)
    assert (info.layers, info.moe_layers) == ([0, 1, 2], list(MOE_LAYERS))
    assert info.targets == ["experts", "k_proj", "o_proj", "q_proj", "v_proj"]
    tensors = native.tensors
    assert info.num_tensors == len(tensors) == 36 and info.dtypes == {"F32": 36}
    assert info.tensor_bytes == sum(t.numel() * 4 for t in tensors.values()) and info.values_checked
    assert "E=6 H=32 I=16" in str(info) and json.loads(json.dumps(info.to_dict()))["r"] == R

    vllm = export_adapter(native.path, tmp_path / "vllm", format="vllm")
    info = inspect_adapter(vllm)
    assert (info.format, info.layout, info.num_tensors, info.shared_outer) == ("vllm", "per-expert", 2 * 6 * E + 24, shared)
    header_only = inspect_adapter(vllm, read_values=False)
    assert header_only.shared_outer is False and not header_only.values_checked  # declared per-expert


# ---- tensor-parallel shards ---------------------------------------------------------------------


def _rank_tensors(dst: Path, tp: int) -> list[dict[str, torch.Tensor]]:
    ranks = []
    for rank in range(tp):
        directory = dst / f"rank{rank}"
        assert json.loads((directory / "tp_shard.json").read_text()) == {"format": "native", "tp_rank": rank, "tp_size": tp}
        assert json.loads((directory / "adapter_config.json").read_text())["r"] == R
        ranks.append({k: v.double() for k, v in load_file(directory / "adapter_model.safetensors").items()})
    return ranks


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_experts_partial_outputs_sum_to_the_unsharded_output(native, tmp_path, tp):
    full = {k: v.double() for k, v in native.tensors.items()}
    ranks = _rank_tensors(shard_adapter(native.path, tmp_path / "tp", tp), tp)
    gen = torch.Generator().manual_seed(tp)
    T, k = 7, 2
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    top_k_index = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    top_k_weights = torch.rand(T, k, generator=gen, dtype=torch.float64)
    gate_up = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64) * 0.2
    down = torch.randn(E, H, I, generator=gen, dtype=torch.float64) * 0.2
    for layer in MOE_LAYERS:
        p = EXPERTS.format(layer)

        def factors(tensors):
            return {name: tensors[f"{p}.{name}.weight"] for name in ("w1.lora_A", "w1.lora_B", "w3.lora_A", "w3.lora_B", "w2.lora_A", "w2.lora_B")}

        want = naive_moe_lora(x, top_k_index, top_k_weights, gate_up, down, factors(full), SCALING)
        got = torch.zeros_like(want)
        step = I // tp
        for rank, tensors in enumerate(ranks):
            cols = slice(rank * step, (rank + 1) * step)
            # the base weights as transformers' TP plan holds them: packed_colwise [gate shard; up shard], rowwise down
            local_gate_up = torch.cat([gate_up[:, :I][:, cols], gate_up[:, I:][:, cols]], dim=1)
            got += naive_moe_lora(x, top_k_index, top_k_weights, local_gate_up, down[:, :, cols], factors(tensors), SCALING)
        assert (got - want).abs().max() < 1e-12
        assert ranks[0][f"{p}.w1.lora_B.weight"].shape == (E, I // tp, R)
        assert torch.equal(ranks[-1][f"{p}.w1.lora_A.weight"], full[f"{p}.w1.lora_A.weight"])  # replicated


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_attention_column_and_row_parallel_outputs(shared_native, tmp_path, tp):
    full = {k: v.double() for k, v in shared_native.tensors.items()}
    ranks = _rank_tensors(shard_adapter(shared_native.path, tmp_path / "tp", tp), tp)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, H, generator=gen, dtype=torch.float64)
    for layer in range(3):
        for proj, out in ATTENTION_OUT.items():
            p = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            in_features = 32
            W = torch.randn(out, in_features, generator=gen, dtype=torch.float64)
            inp = x if proj != "o_proj" else torch.randn(5, in_features, generator=gen, dtype=torch.float64)

            def linear(W, A, B, inp):  # y = W x + s B A x
                return inp @ W.T + SCALING * (inp @ A.T) @ B.T

            want = linear(W, full[f"{p}.lora_A.weight"], full[f"{p}.lora_B.weight"], inp)
            parts = []
            for rank, tensors in enumerate(ranks):
                A, B = tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"]
                if proj == "o_proj":  # row-parallel: each rank holds input columns; partial outputs are summed
                    cols = slice(rank * in_features // tp, (rank + 1) * in_features // tp)
                    parts.append(linear(W[:, cols], A, B, inp[:, cols]))
                else:  # column-parallel: each rank holds output rows; outputs are concatenated
                    rows = slice(rank * out // tp, (rank + 1) * out // tp)
                    parts.append(linear(W[rows], A, B, inp))
            got = sum(parts) if proj == "o_proj" else torch.cat(parts, dim=-1)
            assert (got - want).abs().max() < 1e-12, p


def test_shard_refuses_uneven_splits_before_writing(shared_native, tmp_path):
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts\.w1\.lora_B\.weight: dim 1 has size 16.* 3 tensor-parallel"):
        shard_adapter(shared_native.path, tmp_path / "tp3", 3)
    assert not (tmp_path / "tp3").exists() and not leftovers(tmp_path)


def test_shard_in_vllm_layout_slices_every_expert(shared_native, tmp_path):
    dst = shard_adapter(shared_native.path, tmp_path / "tp", 2, format="vllm")
    full = shared_native.tensors
    rank1 = load_file(dst / "rank1" / "adapter_model.safetensors")
    p = EXPERTS.format(2)
    assert torch.equal(rank1[f"{p}.5.gate_proj.lora_B.weight"], full[f"{p}.w1.lora_B.weight"][5, I // 2 :])
    assert torch.equal(rank1[f"{p}.5.down_proj.lora_A.weight"], full[f"{p}.w2.lora_A.weight"][5, :, I // 2 :])
    assert torch.equal(rank1[f"{p}.5.down_proj.lora_B.weight"], full[f"{p}.w2.lora_B.weight"][0])


def test_native_shard_loads_into_a_tp_local_model(shared_native, tmp_path):
    """Rank i's native shard fits what the tuner builds on that rank's local modules."""
    from transformers import AutoModelForCausalLM

    dst = shard_adapter(shared_native.path, tmp_path / "tp", 2)
    # the tiny model as one of 2 TP ranks holds it: half the heads, half of each expert's I
    local = qwen3_moe_config(num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=I // 2)
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(local), dst / "rank1")
    loaded = dict(model.named_parameters())
    want = shared_native.tensors[f"{EXPERTS.format(2)}.w3.lora_B.weight"][:, I // 2 :]
    assert torch.equal(loaded["base_model.model.model.layers.2.mlp.experts.w3.lora_B.default.weight"], want)
