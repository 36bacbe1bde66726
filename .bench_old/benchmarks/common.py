"""What the GPU benchmarks share: the card's two ceilings, timing, versions, result files."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch
import triton

RESULTS = Path(__file__).with_name("results")


def time_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of `fn` timed with CUDA events (triton's do_bench)."""
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def measured_ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul rate in FLOP/s), measured now."""
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / (time_ms(lambda: dst.copy_(src)) * 1e-3)
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    rate = 2 * n**3 / (time_ms(lambda: a @ b) * 1e-3)
    return bandwidth, rate


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_result(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """benchmarks/results/<name>-<card>.json, and a copy under $OUT when the device tool runs us."""
    card = card_name()
    payload = {"card": card, "versions": versions(), "date": datetime.date.today().isoformat(), **(extra or {}), "rows": rows}
    slug = card.replace(" ", "_")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{slug}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / path.name).write_text(path.read_text())
    return path
