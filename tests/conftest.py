"""Tiny random MoE models for the tests, saved and reloaded so transformers' expert fusion really runs."""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be chosen before triton imports.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig  # noqa: E402

import peft_shared_moe  # noqa: F401,E402  (registers the PEFT type)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 64


def qwen3_moe_config(**overrides) -> Qwen3MoeConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=6,
        num_experts_per_tok=2,
        mlp_only_layers=[1],  # one dense layer among the MoE layers
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return Qwen3MoeConfig(**kwargs)


def mixtral_config() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=5,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def save_random_model(config, path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Non-trivial router and weights: transformers initialises the router weight to zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or "experts" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory) -> str:
    return save_random_model(qwen3_moe_config(), tmp_path_factory.mktemp("qwen3_moe"))


@pytest.fixture(scope="session")
def mixtral_path(tmp_path_factory) -> str:
    return save_random_model(mixtral_config(), tmp_path_factory.mktemp("mixtral"), seed=1)


def load(path: str, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)


def randomize_adapter(model, adapter_name: str = "default", seed: int = 0, scale: float = 0.3) -> None:
    """Non-zero random values for every factor (never a zero B in an equivalence test)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name and (name.endswith("." + adapter_name) or f".{adapter_name}." in name):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)


def input_ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class SavedAdapter:
    """A saved native adapter and the logits of the model that saved it."""

    def __init__(self, path, logits: torch.Tensor) -> None:
        self.path, self.logits = path, logits

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / "adapter_model.safetensors")

    @property
    def config(self) -> dict:
        return json.loads((self.path / "adapter_config.json").read_text())


def model_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


@pytest.fixture(scope="session")
def shared_native(qwen3_path, tmp_path_factory) -> SavedAdapter:
    """A shared-outer rsLoRA adapter with random factors, saved by PEFT."""
    from peft import get_peft_model

    from peft_shared_moe import SharedMoeLoraConfig

    model = get_peft_model(load(qwen3_path), SharedMoeLoraConfig(r=4, lora_alpha=8, use_rslora=True))
    randomize_adapter(model, seed=12)
    path = tmp_path_factory.mktemp("shared_native") / "adapter"
    model.save_pretrained(path)
    return SavedAdapter(path, model_logits(model))
