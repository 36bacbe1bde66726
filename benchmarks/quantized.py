"""A quantized base (NF4, block-wise FP8) against bf16: one decode layer and whole training steps.

Rows `{"scheme": "bf16" | "nf4" | "fp8", "what", "ms" or "tokens_per_s", "peak_gib"}`:
- `decode_layer_T1_graph`: one Qwen3-30B-A3B experts layer (E=128, H=2048, I=768, top-8) with a
  shared-outer r=32 adapter at T = 1, the Triton kernels replayed from a CUDA graph (ms);
- `train_step_48l_seq4096`: the full 48-layer shape with random weights; a quantized base is built
  on the CPU and quantized block by block onto the GPU (`quantize_experts(..., device="cuda")`;
  `load_peak_gib` is the GPU's peak while loading), shared-outer r=32 on experts + attention,
  gradient checkpointing, seq 4096 x 1 (tokens/s, and the step's `peak_gib`). A quantized base
  trains on the torch path (per-expert dequantization); bf16 on the Triton training kernels.
Each quantized layer's output is checked against the torch path before it is timed.
Run on the GPU:  python benchmarks/quantized.py [--skip-steps]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import time_ms, write_result  # noqa: E402
from benchmarks.moe_layer import captured, make_experts, make_lora, routing  # noqa: E402
from peft_shared_moe.ops import EXPERTS_BACKENDS  # noqa: E402
from peft_shared_moe.ops.quantized import SCHEMES  # noqa: E402


def decode_rows() -> list[dict]:
    experts, lora = make_experts("grouped_mm"), make_lora()
    x, idx, w = routing(1, seed=1)
    rows = []
    for scheme in ("bf16", "nf4", "fp8"):
        if scheme == "bf16":
            weights = (experts.gate_up_proj, experts.down_proj)
        else:
            weights = tuple(SCHEMES[scheme](p.detach()) for p in (experts.gate_up_proj, experts.down_proj))
        fn = lambda: EXPERTS_BACKENDS["triton"](x, idx, w, *weights, F.silu, lora=lora)  # noqa: E731
        with torch.no_grad():
            if scheme != "bf16":
                want = EXPERTS_BACKENDS["torch"](x, idx, w, *weights, F.silu, lora=lora).float()
                err = ((fn().float() - want).norm() / want.norm()).item()
                assert err < 1e-2, f"{scheme}: relative error {err:.2e} against the torch path"
            ms = time_ms(captured(fn))
        rows.append({"scheme": scheme, "what": "decode_layer_T1_graph", "ms": round(ms, 4)})
        print(rows[-1], flush=True)
    return rows


def step_row(scheme: str, layers: int = 48, seq: int = 4096) -> dict:
    from benchmarks.train_distributed import add_adapter, build_on_gpu
    from peft_shared_moe import quantize_experts

    torch.cuda.reset_peak_memory_stats()
    if scheme == "bf16":
        model = build_on_gpu(layers)
    else:
        model = build_on_gpu(layers, device="cpu")
        quantize_experts(model, scheme, device="cuda")
    load_peak = torch.cuda.max_memory_allocated() / 2**30
    model = add_adapter(model, "ours")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, 151936, (1, seq), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    row = {"scheme": scheme, "what": f"train_step_{layers}l_seq{seq}", "tokens_per_s": round(seq / (time.perf_counter() - start), 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "load_peak_gib": round(load_peak, 2)}
    del model, optimizer
    torch.cuda.empty_cache()
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--schemes", nargs="*", default=["bf16", "nf4", "fp8"])
    args = parser.parse_args()
    rows = decode_rows()
    if not args.skip_steps:
        rows += [step_row(s, args.layers) for s in args.schemes]
    print(write_result("quantized", rows))


if __name__ == "__main__":
    main()
