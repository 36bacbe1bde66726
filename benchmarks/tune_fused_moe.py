"""Tune the fused experts kernels' tiles on this card; writes its entry for this layer shape (and the
card's default, if it has none) in ops/configs/fused_moe.json.

Each kernel ("gate_up": gated GEMM + LoRA expansion; "down": GEMM + fused shrink) is timed alone,
with a shared-outer r=32 adapter at Qwen3-30B-A3B dims, for each token count, over a short list of
candidates per size regime. Run on the GPU:  python benchmarks/tune_fused_moe.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import card_name, time_ms, write_result  # noqa: E402
from benchmarks.moe_layer import E, H, I, R, make_experts, make_lora, routing  # noqa: E402
from peft_shared_moe.ops.block_routing import align_pairs_to_blocks  # noqa: E402
from peft_shared_moe.ops.kernel_configs import CONFIG_FILE, KernelConfig, shape_key  # noqa: E402
from peft_shared_moe.ops.triton_experts import (  # noqa: E402
    ExpertGemm, LoraExpansion, LoraShrink, dot_precision, launch, pack_lora,
)

# (block_m, block_n, block_k, num_warps, num_stages)
CANDIDATES = {
    "decode": [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4),
               (16, 32, 256, 4, 3), (16, 64, 64, 4, 5)],
    "mid": [(32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (32, 128, 64, 4, 4), (64, 64, 128, 4, 3),
            (16, 64, 128, 4, 4)],
    "large": [(128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 4),
              (128, 256, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 128, 8, 3), (64, 256, 64, 8, 3),
              (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 3), (128, 256, 64, 8, 4)],
}
# vLLM's own tuned tile for this shape on the H200 (its configs/E=128,N=768,device_name=NVIDIA_H200.json,
# the entry at or below each T), compared beside our best. vLLM's gate/up GEMM has N = 2I outputs in
# one tile; ours computes the gate and up halves of a tile together, so its block_n is halved there.
VLLM_H200 = {1: (16, 64, 64, 4, 5), 8: (16, 64, 128, 4, 3), 64: (16, 256, 128, 8, 2), 512: (64, 128, 64, 4, 3),
             4096: (128, 256, 64, 8, 4), 16384: (128, 256, 64, 8, 4)}
TOKENS = {1: "decode", 8: "decode", 64: "decode", 512: "mid", 4096: "large", 16384: "large"}


def time_kernel(kernel: str, config: KernelConfig, x, idx, w, experts, packed) -> float:
    block = align_pairs_to_blocks(idx, E, config.block_m)
    num_pairs = idx.numel()
    pair_weights = w.reshape(-1)
    if kernel == "gate_up":
        a = x @ packed.gate_up_A[0].T
        h = torch.empty(num_pairs, I, dtype=x.dtype, device="cuda")
        gemm = ExpertGemm(x, experts.gate_up_proj, h, block, config, dot_precision(x.dtype), x_row_div=idx.shape[1],
                          gated=True, expansion=LoraExpansion(a, packed.gate_B, 1.0, idx.shape[1], packed.up_B))
    else:
        h = torch.randn(num_pairs, I, dtype=x.dtype, device="cuda")
        out = torch.empty(num_pairs, H, dtype=x.dtype, device="cuda")
        shrink = LoraShrink(packed.down_A, torch.empty(num_pairs, R, dtype=torch.float32, device="cuda"))
        gemm = ExpertGemm(h, experts.down_proj, out, block, config, dot_precision(x.dtype), shrink=shrink,
                          pair_weights=pair_weights)
    launch(gemm)
    return time_ms(lambda: launch(gemm))


def main() -> None:
    experts = make_experts("grouped_mm")
    packed = pack_lora(make_lora(), torch.bfloat16)
    table: dict[str, dict[str, dict]] = {"gate_up": {}, "down": {}}
    rows: list[dict] = []
    for tokens, regime in TOKENS.items():
        x, idx, w = routing(tokens, seed=tokens)
        for kernel in table:
            timings = []
            for cand in CANDIDATES[regime]:
                config = KernelConfig(*cand)
                try:
                    timings.append((time_kernel(kernel, config, x, idx, w, experts, packed), config))
                except Exception as err:  # a tile that does not fit the card's shared memory
                    print(f"  skip {cand}: {type(err).__name__}")
            ms, best = min(timings, key=lambda t: t[0])
            table[kernel][str(tokens)] = best.__dict__
            bm, bn, bk, warps, stages = VLLM_H200[tokens]
            vllm_tile = KernelConfig(bm, bn // 2 if kernel == "gate_up" else bn, bk, warps, stages)
            try:
                vllm_ms = time_kernel(kernel, vllm_tile, x, idx, w, experts, packed)
            except Exception as err:
                vllm_ms = float("nan")
                print(f"  vLLM's tile {vllm_tile}: {type(err).__name__}")
            rows.append({"T": tokens, "kernel": kernel, "best_ms": round(ms, 4), "best": best.__dict__,
                         "vllm_tile_ms": round(vllm_ms, 4), "vllm_tile": vllm_tile.__dict__})
            print(f"T={tokens:>6} {kernel:>7}: best {ms:.4f} ms {best}  (worst {max(t[0] for t in timings):.4f}; "
                  f"vLLM's H200 tile {vllm_ms:.4f} ms)", flush=True)
    data = json.loads(CONFIG_FILE.read_text())
    shapes = data.setdefault(card_name(), {})
    shapes[shape_key(E, H, I)] = table
    shapes.setdefault("default", table)
    CONFIG_FILE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {card_name()!r} {shape_key(E, H, I)} into {CONFIG_FILE}")
    print(f"wrote {write_result('tune_fused_moe', rows, {'shape': shape_key(E, H, I)})}")


if __name__ == "__main__":
    main()
