"""Tile configs for the fused experts kernels, kept as data.

Both files map a card name (`torch.cuda.get_device_name()`) to the layer's shape "E=..,H=..,I=.."
(as vLLM keys its files by E and N); the shape "default" covers shapes not tuned, and cards not in a
file use its "default" card (with a one-time warning).

`configs/fused_moe.json` (inference): per shape and kernel ("gate_up", "down"), a table from token
count to config; the entry with the largest token count <= T is used. `benchmarks/tune_fused_moe.py`
writes it.

`configs/train_experts.json` (training): per shape, one block_m (the routing is built once and shared
by every pass) and a tile per training kernel. `benchmarks/train.py --tune` writes it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

CONFIG_FILE = Path(__file__).with_name("configs") / "fused_moe.json"
TRAIN_CONFIG_FILE = Path(__file__).with_name("configs") / "train_experts.json"
# Small tiles for the Triton interpreter on the CPU: it runs every program one after the other.
INTERPRETER = {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 1}


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # row blocks whose column tiles run together (L2 reuse), see triton_experts._tile_of_program


@lru_cache(maxsize=None)
def _file(path: Path) -> dict:
    return json.loads(path.read_text())


def _for_card(path: Path, card: str) -> dict:
    data = _file(path)
    if card not in data:
        _warn_untuned(path.name, card)
        card = "default"
    return data[card]


@lru_cache(maxsize=None)
def _warn_untuned(file_name: str, card: str) -> None:
    warnings.warn(f"no tuned experts kernel configs for {card!r} in {file_name}; using the defaults")


@lru_cache(maxsize=None)
def _table(card: str, shape: str, kernel: str) -> tuple[tuple[int, KernelConfig], ...]:
    shapes = _for_card(CONFIG_FILE, card)
    tables = shapes[shape] if shape in shapes else shapes["default"]
    rows = sorted((int(t), KernelConfig(**cfg)) for t, cfg in tables[kernel].items())
    return tuple(rows)


@lru_cache(maxsize=None)
def _card(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_card(device: torch.device) -> str:
    return _card(device.index if device.index is not None else torch.cuda.current_device())


def kernel_config(kernel: str, num_tokens: int, device: torch.device, shape: str) -> KernelConfig:
    """The inference tile of `kernel` for T = num_tokens on a layer of `shape` (`shape_key`)."""
    if device.type != "cuda":
        return KernelConfig(**INTERPRETER)
    table = _table(_device_card(device), shape, kernel)
    chosen = table[0][1]
    for tokens, config in table:
        if tokens <= num_tokens:
            chosen = config
    return chosen


TRAIN_KERNELS = ("gate_up", "down", "down_backward", "gate_up_backward", "lora_backward", "outer")


@dataclass(frozen=True)
class TrainConfigs:
    """One tile per training kernel, all with the same block_m (one routing serves every pass)."""

    block_m: int
    gate_up: KernelConfig  # forward x W_gu^T + LoRA, SiLU * up                (N = I,  K = H)
    down: KernelConfig  # forward h W_d^T, rank-r shrink                         (N = H,  K = I)
    down_backward: KernelConfig  # dy W_d + LoRA, SiLU backward epilogue         (N = I,  K = H)
    gate_up_backward: KernelConfig  # d_pre W_gu                                 (N = H,  K = 2I)
    lora_backward: KernelConfig  # d_gate B_gate, d_up B_up                      (N = r,  K = I)
    outer: KernelConfig  # per-expert factor gradients, block_n over N


def shape_key(num_experts: int, hidden: int, inter: int) -> str:
    return f"E={num_experts},H={hidden},I={inter}"


def parse_train_configs(entry: dict) -> TrainConfigs:
    block_m = entry["block_m"]
    return TrainConfigs(block_m, *(KernelConfig(block_m=block_m, **entry[k]) for k in TRAIN_KERNELS))


@lru_cache(maxsize=None)
def _train_configs(card: str, key: str) -> TrainConfigs:
    shapes = _for_card(TRAIN_CONFIG_FILE, card)
    return parse_train_configs(shapes.get(key, shapes["default"]))


def train_configs(num_experts: int, hidden: int, inter: int, device: torch.device) -> TrainConfigs:
    if device.type != "cuda":
        return TrainConfigs(INTERPRETER["block_m"], *(KernelConfig(**INTERPRETER) for _ in TRAIN_KERNELS))
    return _train_configs(_device_card(device), shape_key(num_experts, hidden, inter))
