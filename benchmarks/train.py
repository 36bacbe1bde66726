"""Training cost of the adapter on one GPU: one MoE layer forward + backward, and whole training steps.

Layer rows (Qwen3-30B-A3B layer: E=128, H=2048, I=768, top-8, bf16, r=32 shared-outer, the base
frozen, the input needing its gradient): transformers' grouped_mm base alone, PEFT
target_parameters (r=32 per expert), our torch path (autograd), our torch_fused path (hand-written
backward), and the floor (training FLOPs over the measured bf16 matmul rate). Each of ours is checked
against the torch path's gradients before it is timed; `peak_gib` is the memory one forward +
backward adds.

Step rows (benchmarks/train_distributed.py, one GPU): an 8-layer model at seq 2048 x 4 with and
without gradient checkpointing, and the full 48 layers at seq 4096 x 1 with it; the frozen base
without adapter, PEFT, ours (backend auto: the torch path for training) and ours torch_fused.

    python benchmarks/train.py            # both parts -> benchmarks/results/train-<card>.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import measured_ceilings, time_ms, write_result  # noqa: E402
from benchmarks.moe_layer import E, H, I, K, make_experts, make_lora, peft_target_parameters, routing  # noqa: E402
from peft_shared_moe.ops import EXPERTS_BACKENDS, ExpertsLayout  # noqa: E402

STEP_ROWS = [
    (mode, 1, layers, seq, batch, impl, gc)
    for layers, seq, batch, gcs in [(8, 2048, 4, (False, True)), (48, 4096, 1, (True,))]
    for gc in gcs
    for impl in ("frozen_base", "peft_target_parameters", "ours", "ours_torch_fused")
    for mode in ("single",)
]


def layer_rows(tokens_list: list[int]) -> list[dict]:
    _, rate = measured_ceilings()
    base = make_experts("grouped_mm")
    for p in base.parameters():
        p.requires_grad_(False)
    weights = (base.gate_up_proj, base.down_proj)
    layout = ExpertsLayout(E, H, I)
    lora = make_lora()
    for t in lora.values():
        t.requires_grad_(True)
    peft_experts = peft_target_parameters(make_experts("grouped_mm"), make_lora(shared=False))
    impls = {
        "transformers_grouped_mm_frozen": lambda x, i, w: base(x, i, w),
        "peft_target_parameters": lambda x, i, w: peft_experts(x, i, w),
        "ours_torch": lambda x, i, w: EXPERTS_BACKENDS["torch"](x, i, w, *weights, F.silu, lora=lora, layout=layout),
        "ours_torch_fused": lambda x, i, w: EXPERTS_BACKENDS["torch_fused"](
            x, i, w, *weights, F.silu, lora=lora, layout=layout),
    }
    rows = []
    for tokens in tokens_list:
        x, idx, w = routing(tokens, seed=tokens)
        x.requires_grad_(True)
        probe = torch.randn_like(x)

        def step(fn):
            return lambda: torch.autograd.backward(fn(x, idx, w), probe)

        # the fused backward's gradients against autograd's before timing anything
        grads = {}
        for name in ("ours_torch", "ours_torch_fused"):
            out = impls[name](x, idx, w)
            grads[name] = torch.autograd.grad(out, [x, *lora.values()], probe)
        for a, b in zip(grads["ours_torch_fused"], grads["ours_torch"]):
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
            assert err < 2e-2, f"torch_fused gradient off by {err:.2e} at T={tokens}"
        for name, fn in impls.items():
            ms = time_ms(step(fn))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(fn)()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**30
            x.grad = None
            for t in lora.values():
                t.grad = None
            rows.append({"impl": name, "T": tokens, "ms": round(ms, 3), "peak_gib": round(peak, 3)})
        # forward 3 GEMMs per pair, backward the input gradient through the same 3 (weights frozen)
        flops = 2 * tokens * K * 6 * H * I
        rows.append({"impl": "floor", "T": tokens, "ms": round(flops / rate * 1e3, 3), "peak_gib": None})
        print("  ".join(f"{r['impl']}={r['ms']}ms/{r['peak_gib']}GiB" for r in rows if r["T"] == tokens), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--skip-steps", action="store_true", help="the layer rows only")
    p.add_argument("--step-rows", nargs="*", type=int, help="only these entries of STEP_ROWS (to split long runs)")
    p.add_argument("--workdir", help="where step rows accumulate (reuse it to add rows across runs)")
    args = p.parse_args()
    rows = layer_rows(args.tokens)
    if not args.skip_steps:
        from benchmarks.train_distributed import run_all

        step_args = argparse.Namespace(workdir=args.workdir, rows=args.step_rows, name="train_steps")
        for r in run_all(step_args, STEP_ROWS):
            rows.append({"impl": r["impl"], "gc": r["gradient_checkpointing"], "layers": r["layers"], "seq": r["seq"],
                         "batch": r["batch"], **({"oom": True, "error": r["error"]} if "error" in r else
                                                 {"tokens_per_s": r["tokens_per_s_per_gpu"],
                                                  "peak_gib": r["peak_gib_per_gpu"]})})
    print(write_result("train", rows))


if __name__ == "__main__":
    main()
