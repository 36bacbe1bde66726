"""One validation for every LoRA setting: `SharedMoeLoraConfig` and every adapter_config.json read
refuse the same wrong types and values, naming where they came from and the key."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from peft import PeftModel

from peft_shared_moe import SharedMoeLoraConfig, export_adapter, import_adapter, inspect_adapter
from peft_shared_moe.config import pattern_problem
from peft_shared_moe.formats.io import write_config
from tests.conftest import load, qwen3_moe_config

# (key, a wrong value, what the message says is expected); JSON-representable so files can carry them
BAD_VALUES = [
    ("use_rslora", "false", "use_rslora must be true or false"),
    ("shared_outer", "no", "shared_outer must be true or false"),
    ("use_rslora", 0, "use_rslora must be true or false"),
    ("lora_alpha", True, "lora_alpha must be a finite positive number"),
    ("lora_alpha", "16", "lora_alpha must be a finite positive number"),
    ("lora_alpha", float("nan"), "lora_alpha must be a finite positive number"),
    ("lora_alpha", float("inf"), "lora_alpha must be a finite positive number"),
    ("r", 4.0, "r must be a positive integer"),
    ("r", True, "r must be a positive integer"),
    ("lora_dropout", "0.1", "lora_dropout must be a number in [0, 1)"),
    ("init_lora_weights", "pissa", "init_lora_weights must be one of [True, False, 'gaussian']"),
    ("init_lora_weights", "false", "init_lora_weights must be one of [True, False, 'gaussian']"),
    ("layers_to_transform", [1.0], "layers_to_transform must be null, a layer index"),
    ("layers_pattern", [""], "layers_pattern must be null, a name"),
    ("bias", "some", "bias must be one of ['none', 'all', 'lora_only']"),
    ("target_modules", [""], "target_modules must be null, a non-empty name"),
    ("target_modules", "", "target_modules must be null, a non-empty name"),
]


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("key, value, expected", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_the_config_class_and_the_file_reader_refuse_the_same_values(shared_native, qwen3_path, tmp_path, key, value, expected):
    with pytest.raises(ValueError, match=r"^SharedMoeLoraConfig: " + re.escape(expected)):
        SharedMoeLoraConfig(**{key: value})

    src = _with_config(shared_native.path, tmp_path / "adapter", **{key: value})
    with pytest.raises(ValueError, match=re.escape(f"{src}/adapter_config.json: {expected}")):
        inspect_adapter(src)
    with pytest.raises(ValueError, match=re.escape(expected)):  # PEFT's own loader goes through the config class
        PeftModel.from_pretrained(load(qwen3_path), src)


def test_bias_field_takes_the_peft_values():
    assert SharedMoeLoraConfig().bias == "none"
    assert SharedMoeLoraConfig(bias="lora_only").bias == "lora_only"


def _lora_adapter(shared_native, path: Path, **changes) -> Path:
    """The fixture's tensors under a plain LoRA config (an sglang export), with `changes` to its config."""
    plain = export_adapter(shared_native.path, path.with_name(path.name + "_plain"))
    return _with_config(plain, path, **changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": "false"}, "use_dora must be true or false, found 'false'"),
        ({"lora_bias": "no"}, "lora_bias must be true or false, found 'no'"),
        ({"rank_pattern": {"model.layers.0.self_attn.q_proj": True}}, "rank_pattern['model.layers.0.self_attn.q_proj'] must be a positive integer"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern['q_proj'] must be a finite positive number, found nan"),
        ({"alpha_pattern": {"q_proj": "8"}}, "alpha_pattern['q_proj'] must be a finite positive number"),
        ({"rank_pattern": {"(a+)+$": 4}}, "rank_pattern key '(a+)+$' is refused: it repeats a group"),
        ({"alpha_pattern": {r"(q|k)\1": 4}}, "alpha_pattern key '(q|k)\\\\1' is refused: it uses a backreference"),
        ({"rank_pattern": {"x" * 300: 4}}, "is refused: it is longer than 256 characters"),
        ({"task_type": "CAUSAL"}, "task_type must be null or one of"),
    ],
)
def test_lora_configs_read_from_files_are_checked_before_anything_is_written(shared_native, tmp_path, changes, message):
    src = _lora_adapter(shared_native, tmp_path / "in", **changes)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(ValueError) as err:
        export_adapter(src, tmp_path / "out" / "sglang", format="sglang")
    assert f"{src}/adapter_config.json: " in str(err.value) and message in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


@pytest.mark.parametrize(
    "pattern", [r"q_proj", r"model\.layers\.\d+\.mlp", r"layers\.(0|2)\.self_attn\..*", r"^model.layers.1.self_attn.q_proj",
                r"[a-z_]+\.experts", r"(?:q|k|v)_proj", r"layers\.1[0-9]?\.mlp"],
)
def test_ordinary_patterns_are_in_the_safe_subset(pattern):
    assert pattern_problem(pattern) is None


@pytest.mark.parametrize(
    "pattern, why",
    [("(a+)+b", "repeats a group"), ("(a|a)*b", "repeats a group"), ("(?:x.*)+", "repeats a group"),
     ("(a*)?", "repeats a group"), ("a*a*a*a*b", "4 quantifiers"), (".{0,9}.{0,9}.{0,9}x", "3 quantifiers"),
     ("(?=q)q", "lookaround"), (r"(q)\1", "backreference"), ("(unclosed", "not a valid regular expression"),
     ("a" * 257, "longer than 256")],
)
def test_patterns_that_can_backtrack_for_long_are_refused(pattern, why):
    assert why in (pattern_problem(pattern) or "")


def test_a_class_with_quantifier_characters_inside_is_one_atom():
    assert pattern_problem(r"[*+?{}()]+\.[]x(]proj") is None


def test_non_finite_values_are_never_written_as_json(tmp_path):
    with pytest.raises(ValueError):
        write_config(tmp_path, {"lora_alpha": math.inf})
    assert not (tmp_path / "adapter_config.json").exists()


def test_deeply_nested_json_is_bad_input(shared_native, tmp_path):
    src = _with_config(shared_native.path, tmp_path / "nested")
    (src / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON \(RecursionError"):
        inspect_adapter(src)


@pytest.mark.parametrize(
    "changes, message",
    [({"hidden_size": "big"}, "hidden_size"), ({"num_attention_heads": 0}, "ZeroDivisionError"),
     ({"model_type": 3}, "model_type must be a string")],
)
def test_a_bad_base_config_is_bad_input(shared_native, tmp_path, changes, message):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({**qwen3_moe_config().to_dict(), **changes}))
    with pytest.raises(ValueError, match=f"base .*{message}"):
        import_adapter(shared_native.path, tmp_path / "out", base=base)
    assert not (tmp_path / "out").exists()
