"""Host memory while `from_pretrained` loads a MoE checkpoint: plainly, and with its experts quantized
as they load (`ExpertsQuantizationConfig`). Each load runs in its own process; the figure is the peak
anonymous RSS above the process's start (the checkpoint's mmapped pages are page cache, not counted),
sampled every 2 ms. A 6-layer Qwen3-MoE with 64 experts, H=1024, I=512 in bf16 (1.13 GiB of experts).
Run:  python benchmarks/quantized_loading.py   (CPU; rows {"scheme", "what": "load_peak_gib", ...})
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _anon_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def measure(path: str, scheme: str) -> None:
    """One load in this process; prints its row as the last line."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from peft_shared_moe import ExpertsQuantizationConfig

    start, peak, done = _anon_gib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _anon_gib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    kwargs = {} if scheme == "bf16" else {"quantization_config": ExpertsQuantizationConfig(scheme)}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs)
    done.set()
    sampler.join()
    print(json.dumps({"scheme": scheme, "what": "load_peak_gib", "peak_gib": round(peak[0] - start, 3),
                      "held_gib": round(_anon_gib() - start, 3), "layers": len(model.model.layers)}))


def main() -> None:
    import json

    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from benchmarks.common import write_result

    config = Qwen3MoeConfig(vocab_size=128, hidden_size=1024, intermediate_size=64, moe_intermediate_size=512,
                            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=64, num_experts_per_tok=2)
    rows = []
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        for scheme in ("bf16", "nf4", "fp8"):
            out = subprocess.run([sys.executable, __file__, "--measure", path, scheme], capture_output=True, text=True,
                                 check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(write_result("quantized_loading", rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure(sys.argv[2], sys.argv[3])
    else:
        main()
