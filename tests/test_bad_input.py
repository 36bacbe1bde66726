"""Bad input gets a ValueError that names the culprit, raised before any weight changes."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM

from peft_shared_moe import SharedMoeLoraConfig
from tests.conftest import load, qwen3_moe_config, randomize_adapter, save_random_model


@pytest.mark.parametrize("r", [0, -3])
def test_rank_must_be_positive(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        SharedMoeLoraConfig(r=r)


def test_unknown_target_is_named(qwen3_path):
    base = load(qwen3_path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="nonexistent_proj"):
        get_peft_model(base, SharedMoeLoraConfig(target_modules=["experts", "nonexistent_proj"]))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not any("lora" in n for n, _ in base.named_modules())


def test_non_linear_target_is_refused(qwen3_path):
    with pytest.raises(ValueError, match=r"'gate'.*Qwen3MoeTopKRouter.*nn.Linear"):
        get_peft_model(load(qwen3_path), SharedMoeLoraConfig(target_modules=["gate"]))


def test_experts_on_a_dense_model():
    dense = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8)
    )
    with pytest.raises(ValueError, match="'experts'.*no fused experts block"):
        get_peft_model(dense, SharedMoeLoraConfig(target_modules=["experts"]))


def _snapshot(path) -> dict:
    return {name: (os.stat(path / name).st_mtime_ns, (path / name).read_bytes()) for name in os.listdir(path)}


@pytest.mark.parametrize(
    "other, found",
    [
        (dict(num_experts=8), "[8, 16, 4]"),  # wrong E
        (dict(moe_intermediate_size=24), "[6, 24, 4]"),  # wrong I
        (dict(hidden_size=48, head_dim=12), "48"),  # wrong H
        ("rank", "[1, 2, 32]"),  # wrong r
    ],
)
def test_adapter_that_does_not_fit_is_refused_untouched(qwen3_path, tmp_path, other, found):
    if other == "rank":
        source_path, adapter_cfg = qwen3_path, SharedMoeLoraConfig(r=2, lora_alpha=8)
    else:
        source_path = save_random_model(qwen3_moe_config(**other), tmp_path / "other_base")
        adapter_cfg = SharedMoeLoraConfig(r=4, lora_alpha=8)
    source = get_peft_model(load(source_path), adapter_cfg)
    randomize_adapter(source)
    adapter_dir = tmp_path / "adapter"
    source.save_pretrained(adapter_dir)
    if other == "rank":  # same model, but the config claims another rank than the tensors have
        text = (adapter_dir / "adapter_config.json").read_text().replace('"r": 2', '"r": 4')
        (adapter_dir / "adapter_config.json").write_text(text)
    files_before = _snapshot(adapter_dir)

    base = load(qwen3_path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"expected shape .* found") as err:
        PeftModel.from_pretrained(base, adapter_dir)
    assert found in str(err.value) and "experts.w" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items() if k in before)
    assert _snapshot(adapter_dir) == files_before
