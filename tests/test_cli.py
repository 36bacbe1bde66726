"""The `peft-shared-moe` console script: help, exit codes, and each subcommand end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_shared_moe import export_adapter, formats
from peft_shared_moe.cli import main
from tests.conftest import load, model_logits
from tests.test_formats import leftovers


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["convert", "--help"], ["shard", "--help"], ["merge", "--help"]])
def test_help(argv, capsys):
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "usage: peft-shared-moe" in text
    if argv == ["--help"]:
        assert "exit codes" in text and "--experts-shared-outer-loras" in text and "E times the space" in text


def test_convert_and_inspect(shared_native, tmp_path, capsys):
    assert main(["convert", str(shared_native.path), str(tmp_path / "vllm"), "--to", "vllm", "--no-progress"]) == 0
    want = export_adapter(shared_native.path, tmp_path / "api", format="vllm")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "vllm" / name).read_bytes() == (want / name).read_bytes()
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "vllm"), "--json", "--no-progress"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["shared_outer"], info["num_experts"]) == ("vllm", True, 6)
    assert main(["convert", str(tmp_path / "vllm"), str(tmp_path / "back"), "--to", "native", "--shared-outer", "no"]) == 0
    assert load_file(tmp_path / "back" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.mlp.experts.w1.lora_A.weight"
    ].shape == (6, 4, 32)
    assert main(["shard", str(shared_native.path), str(tmp_path / "tp"), "--tp", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "tp").iterdir()) == ["rank0", "rank1"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "{tmp}/nowhere"], "not an adapter directory"),
        (["convert", "{src}", "{tmp}", "--to", "sglang"], "exists; pass overwrite=True (--force)"),
        (["shard", "{src}", "{tmp}/tp3", "--tp", "3"], "cannot split evenly"),
        (["convert", "{src}", "{tmp}/x", "--to", "onnx"], "invalid choice"),
        (["shard", "{src}", "{tmp}/x"], "--tp"),
    ],
)
def test_bad_input_exits_2_with_a_message(shared_native, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, src=shared_native.path) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_other_failures_exit_1(shared_native, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formats, "convert_adapter", broken)
    assert main(["convert", str(shared_native.path), str(tmp_path / "out"), "--to", "sglang"]) == 1
    assert "No space left on device" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "peft-shared-moe"
    result = subprocess.run([str(script), "inspect", "/nonexistent/adapter"], capture_output=True, text=True)
    assert result.returncode == 2 and "not an adapter directory" in result.stderr


def test_merge_gives_a_checkpoint_with_the_adaptermodel_logits(shared_native, qwen3_path, tmp_path):
    from transformers import AutoModelForCausalLM

    sglang = export_adapter(shared_native.path, tmp_path / "sglang")  # merged through the import path
    out = tmp_path / "merged"
    assert main(["merge", "--base", qwen3_path, "--adapter", str(sglang), "--out", str(out), "--no-progress"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(model_logits(merged), shared_native.logits, rtol=1e-5, atol=1e-5)
    assert (model_logits(merged) - model_logits(load(qwen3_path))).abs().max() > 1e-3  # the adapter did change the model
    assert not leftovers(tmp_path)

    assert main(["merge", "--base", qwen3_path, "--adapter", str(sglang), "--out", str(out)]) == 2  # exists


def test_version(capsys):
    from peft_shared_moe import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"peft-shared-moe {__version__}\n"


def test_no_progress_silences_every_progress_bar(shared_native, qwen3_path, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    capfd.readouterr()
    assert main(["merge", "--base", qwen3_path, "--adapter", str(shared_native.path), "--out", str(tmp_path / "m"),
                 "--no-progress"]) == 0
    assert main(["convert", str(shared_native.path), str(tmp_path / "v"), "--to", "vllm", "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert not any(mark in err for mark in ("\r", "%|", "it/s", "s/it", "Loading", "Writing")), err
    assert hf_logging.is_progress_bar_enabled()  # the setting is restored for the rest of the process


def _adapter_with(src: Path, dst: Path, text: str) -> Path:
    shutil.copytree(src, dst)
    (dst / "adapter_config.json").write_text(text)
    return dst


def _base_with(qwen3_path: str, dst: Path, text: str) -> Path:
    shutil.copytree(qwen3_path, dst)
    (dst / "config.json").write_text(text)
    return dst


@pytest.mark.parametrize(
    "case, message",
    [
        ("nested JSON", "adapter_config.json: not valid JSON (RecursionError"),
        ("string for a bool", "adapter_config.json: use_rslora must be true or false, found 'false'"),
        ("NaN alpha", "adapter_config.json: lora_alpha must be a finite positive number, found nan"),
        ("bad base config", "config.json: cannot be read"),
        ("base config is a list", "config.json: expected a JSON object, found list"),
        ("merge with a bad base config", "config.json: cannot be read"),
        ("merge with a base without weights", "no weights (expected *.safetensors files, or *.bin files)"),
    ],
)
def test_every_bad_input_exits_2(shared_native, qwen3_path, tmp_path, capsys, case, message):
    config = shared_native.config
    adapter, base_args = shared_native.path, []
    if case == "nested JSON":
        adapter = _adapter_with(adapter, tmp_path / "in", "[" * 50_000 + "]" * 50_000)
    elif case == "string for a bool":
        adapter = _adapter_with(adapter, tmp_path / "in", json.dumps({**config, "use_rslora": "false"}))
    elif case == "NaN alpha":
        adapter = _adapter_with(adapter, tmp_path / "in", json.dumps({**config, "lora_alpha": float("nan")}))
    elif case == "merge with a base without weights":
        base = Path(shutil.copytree(qwen3_path, tmp_path / "base"))
        (base / "model.safetensors").unlink()
        base_args = ["--base", str(base)]
    else:
        bad = "[1]" if "list" in case else json.dumps({**json.loads(Path(qwen3_path, "config.json").read_text()),
                                                        "hidden_size": "big"})
        base_args = ["--base", str(_base_with(qwen3_path, tmp_path / "base", bad))]
    out = tmp_path / "out"
    if case.startswith("merge"):
        argv = ["merge", *base_args, "--adapter", str(adapter), "--out", str(out)]
    else:
        argv = ["convert", str(adapter), str(out), "--to", "sglang", *base_args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists() and not leftovers(tmp_path)


def test_a_closed_pipe_ends_quietly(shared_native):
    """`peft-shared-moe inspect X | head -1`: the reader is gone before we write."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from peft_shared_moe.cli import main; sys.exit(main())"
    child = subprocess.Popen([sys.executable, "-c", code, "inspect", str(shared_native.path), "--json", "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    child.stdout.close()  # as `head -1` does once it has its line
    stderr = child.stderr.read().decode()
    assert child.wait() == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr, stderr


def test_merge_refuses_an_adapter_of_another_architecture(shared_native, qwen3_path, tmp_path, capsys):
    """Shapes alike, classes not: the adapter records the class it was trained on (PEFT's auto_mapping)."""
    adapter = tmp_path / "adapter"
    shutil.copytree(shared_native.path, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == "Qwen3MoeForCausalLM"
    config["auto_mapping"]["base_model_class"] = "MixtralForCausalLM"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    argv = ["merge", "--base", qwen3_path, "--adapter", str(adapter), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "MixtralForCausalLM" in err and "Qwen3MoeForCausalLM" in err and "--allow-other-architecture" in err
    assert not out.exists() and not leftovers(tmp_path)
    assert main(argv + ["--allow-other-architecture"]) == 0 and (out / "config.json").is_file()
