"""Tile configs for the fused experts kernels, kept as data: `configs/fused_moe.json`.

The file maps a card name (`torch.cuda.get_device_name()`) to, per kernel ("gate_up", "down"), a
table from token count to config; the entry with the largest token count <= T is used. Cards not in
the file use "default" (with a one-time warning). `benchmarks/tune_fused_moe.py` writes the file.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

CONFIG_FILE = Path(__file__).with_name("configs") / "fused_moe.json"
# Small tiles for the Triton interpreter on the CPU: it runs every program one after the other.
INTERPRETER = {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 1}


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@lru_cache(maxsize=None)
def _table(card: str, kernel: str) -> tuple[tuple[int, KernelConfig], ...]:
    data = json.loads(CONFIG_FILE.read_text())
    if card not in data:
        warnings.warn(f"no tuned fused-MoE configs for {card!r} in {CONFIG_FILE.name}; using the defaults")
        card = "default"
    rows = sorted((int(t), KernelConfig(**cfg)) for t, cfg in data[card][kernel].items())
    return tuple(rows)


@lru_cache(maxsize=None)
def _card(index: int) -> str:
    return torch.cuda.get_device_name(index)


def kernel_config(kernel: str, num_tokens: int, device: torch.device) -> KernelConfig:
    if device.type != "cuda":
        return KernelConfig(**INTERPRETER)
    table = _table(_card(device.index if device.index is not None else torch.cuda.current_device()), kernel)
    chosen = table[0][1]
    for tokens, config in table:
        if tokens <= num_tokens:
            chosen = config
    return chosen
