"""Adapters trained with PEFT's own MoE route (`LoraConfig(target_parameters=[... gate_up_proj,
... down_proj])`) imported into our per-expert layout: logits against PEFT's own `ParamWrapper`
forward on the same adapter, in float64, on every architecture the tuner supports; and what the
import refuses."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peft_shared_moe.formats import AdapterFormatError, import_adapter
from peft_shared_moe.formats.io import read_json_object
from tests.test_architectures import SUPPORTED, build, output, rel_err

PEFT_EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def peft_adapter(model, path, seed: int = 4, target_modules=None):
    """PEFT's LoRA on the experts' parameters (and `target_modules`), random non-zero factors, saved."""
    config = LoraConfig(r=3, lora_alpha=5, target_modules=target_modules or [], target_parameters=PEFT_EXPERTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    peft_model.save_pretrained(path)
    return peft_model


@pytest.mark.parametrize("case", SUPPORTED)
def test_imported_adapter_equals_peft_own_forward(case, tmp_path):
    model = build(case)
    if not type(model).__name__.endswith("ForCausalLM"):
        pytest.skip(f"{type(model).__name__}: the import reads a base as a causal LM")
    base_out = output(model)
    try:
        want = output(peft_adapter(model, tmp_path / "peft"))
    except Exception as err:  # PEFT's own route cannot run this model: nothing to compare against
        pytest.skip(f"PEFT target_parameters fails on {case.model_type}: {type(err).__name__}: {str(err)[:120]}")
    assert rel_err(want, base_out) > 1e-4  # the adapter changes the output
    try:
        import_adapter(tmp_path / "peft", tmp_path / "ours", base=model.config)
    except AdapterFormatError as err:
        if "no causal-LM model can be built" not in str(err):
            raise
        pytest.skip(f"{case.model_type}: AutoModelForCausalLM cannot build its config, so no base to read against")
    assert read_json_object(tmp_path / "ours" / "adapter_config.json")["shared_outer"] is False
    ours = PeftModel.from_pretrained(build(case), tmp_path / "ours")
    assert rel_err(output(ours), want) <= case.tol


def test_attention_lora_beside_and_a_shared_A_detected(qwen3_path, tmp_path):
    """q/v LoRA travel along; a PEFT A that is the same for every expert is stored shared."""
    from tests.conftest import input_ids, load

    model = load(qwen3_path, dtype=torch.float64, experts_implementation="eager")
    peft_model = peft_adapter(model, tmp_path / "peft", target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # one A for all experts (expert index slowest in PEFT's A rows)
        for layer in peft_model.base_model.model.model.layers:
            if not hasattr(layer.mlp, "experts"):  # a dense layer
                continue
            wrapper = layer.mlp.experts.base_layer  # the inner wrapper: gate_up_proj
            weight = wrapper.lora_A["default"].weight
            num_experts = wrapper.num_experts
            weight.copy_(weight[: weight.shape[0] // num_experts].repeat(num_experts, 1))
        peft_model.save_pretrained(tmp_path / "peft")
        want = peft_model(input_ids=input_ids()).logits
    import_adapter(tmp_path / "peft", tmp_path / "ours", base=qwen3_path)
    config = read_json_object(tmp_path / "ours" / "adapter_config.json")
    assert sorted(config["target_modules"]) == ["experts", "q_proj", "v_proj"]
    ours = PeftModel.from_pretrained(load(qwen3_path, dtype=torch.float64), tmp_path / "ours")
    with torch.no_grad():
        assert rel_err(ours(input_ids=input_ids()).logits, want) < 1e-10


def test_refused_without_base_and_on_a_wrong_base(qwen3_path, mixtral_path, tmp_path):
    from tests.conftest import load

    peft_adapter(load(qwen3_path, dtype=torch.float64, experts_implementation="eager"), tmp_path / "peft")
    with pytest.raises(AdapterFormatError, match="PEFT target_parameters adapter.*pass base="):
        import_adapter(tmp_path / "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(AdapterFormatError, match="expected PEFT's"):
        import_adapter(tmp_path / "peft", tmp_path / "out", base=mixtral_path)
    assert not (tmp_path / "out").exists()


def test_only_one_parameter_targeted_is_refused(qwen3_path, tmp_path):
    from tests.conftest import load

    model = load(qwen3_path, dtype=torch.float64, experts_implementation="eager")
    config = LoraConfig(r=3, lora_alpha=5, target_modules=[], target_parameters=["experts.gate_up_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, config).save_pretrained(tmp_path / "peft")
    with pytest.raises(AdapterFormatError, match="no PEFT LoRA on down_proj"):
        import_adapter(tmp_path / "peft", tmp_path / "out", base=qwen3_path)
    assert not (tmp_path / "out").exists()


def test_command_line_import_and_its_refusal(qwen3_path, tmp_path, capsys):
    from peft_shared_moe.cli import main
    from tests.conftest import load

    peft_adapter(load(qwen3_path, dtype=torch.float64, experts_implementation="eager"), tmp_path / "peft")
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "bad"), "--to", "native", "--no-progress"]) == 2
    assert "pass base=" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "ours"), "--to", "native", "--base", qwen3_path,
                 "--no-progress"]) == 0
    assert main(["inspect", str(tmp_path / "ours"), "--json", "--no-progress"]) == 0
    assert '"shared_outer": false' in capsys.readouterr().out


def test_rank_or_alpha_patterns_are_refused(qwen3_path, tmp_path):
    """PEFT keys them on parameter names, which the converted modules do not have: never dropped silently."""
    import json

    from tests.conftest import load

    peft_adapter(load(qwen3_path, dtype=torch.float64, experts_implementation="eager"), tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "alpha_pattern": {"experts.down_proj": 9}}))
    with pytest.raises(AdapterFormatError, match="alpha_pattern"):
        import_adapter(tmp_path / "peft", tmp_path / "out", base=qwen3_path)
    assert not (tmp_path / "out").exists()
