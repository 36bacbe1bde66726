"""Training cost of the adapter on one GPU: one MoE layer forward + backward, and whole training steps.

Layer rows (Qwen3-30B-A3B layer: E=128, H=2048, I=768, top-8, bf16, r=32 shared-outer with float32
factors, the base frozen, the input needing its gradient): transformers' grouped_mm base alone, PEFT
target_parameters (r=32 per expert), our torch path (autograd), our torch_fused path (hand-written
backward), our Triton training kernels, and the floor (training FLOPs over the measured bf16 matmul
rate). Each of ours is checked against the torch path's gradients before it is timed; `peak_gib` is
the memory one forward + backward adds.

Step rows (benchmarks/train_distributed.py, one GPU): an 8-layer model at seq 2048 x 4 with and
without gradient checkpointing, and the full 48 layers at seq 4096 x 1 with it; the frozen base
without adapter, PEFT, ours (backend auto: the Triton training kernels) and ours with backend torch.

`--tune` searches the training kernels' tiles for this card at the layer's shape (one kernel at a
time, timing the whole layer forward + backward) and prints the JSON entry for
peft_shared_moe/ops/configs/train_experts.json (also written to --tune-out).

    python benchmarks/train.py            # both parts -> benchmarks/results/train-<card>.json
    python benchmarks/train.py --tune --skip-steps --tune-out tuned.json
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

STEP_ROWS = [  # most wanted first, so a run cut short keeps them: 8 layers, 48 layers, then checkpointing at 8
    ("single", 1, layers, seq, batch, impl, gc)
    for layers, seq, batch, gc, impls in [
        (8, 2048, 4, False, ("frozen_base", "ours", "peft_target_parameters", "ours_torch")),
        (48, 4096, 1, True, ("frozen_base", "ours", "ours_torch", "peft_target_parameters")),
        (8, 2048, 4, True, ("frozen_base", "ours", "peft_target_parameters", "ours_torch")),
    ]
    for impl in impls
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
        "ours_triton": lambda x, i, w: EXPERTS_BACKENDS["triton"](x, i, w, *weights, F.silu, lora=lora, layout=layout),
    }
    rows = []
    for tokens in tokens_list:
        x, idx, w = routing(tokens, seed=tokens)
        x.requires_grad_(True)
        w.requires_grad_(True)  # the router is trained through them, as in a model
        probe = torch.randn_like(x)

        def step(fn):
            return lambda: torch.autograd.backward(fn(x, idx, w), probe)

        # the fused backward's gradients against autograd's before timing anything
        grads = {}
        for name in ("ours_torch", "ours_torch_fused", "ours_triton"):
            out = impls[name](x, idx, w)
            grads[name] = torch.autograd.grad(out, [x, w, *lora.values()], probe)
        for name in ("ours_torch_fused", "ours_triton"):
            for what, a, b in zip(["x", "w", *lora.tensors], grads[name], grads["ours_torch"]):
                err = ((a.float() - b.float()).norm() / b.float().norm()).item()
                assert err < 2e-2, f"{name} gradient of {what} off by {err:.2e} at T={tokens}"
        for name, fn in impls.items():
            ms = time_ms(step(fn))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(fn)()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**30
            x.grad = w.grad = None
            for t in lora.values():
                t.grad = None
            rows.append({"impl": name, "T": tokens, "ms": round(ms, 3), "peak_gib": round(peak, 3)})
        # forward 3 GEMMs per pair, backward the input gradient through the same 3 (weights frozen)
        flops = 2 * tokens * K * 6 * H * I
        rows.append({"impl": "floor", "T": tokens, "ms": round(flops / rate * 1e3, 3), "peak_gib": None})
        print("  ".join(f"{r['impl']}={r['ms']}ms/{r['peak_gib']}GiB" for r in rows if r["T"] == tokens), flush=True)
    return rows


def triton_layer_step(tokens: int):
    """One forward + backward of the Triton training path on a fresh layer (base frozen, float32
    factors, input and routing weights needing gradients), as a callable."""
    base = make_experts("grouped_mm")
    for p in base.parameters():
        p.requires_grad_(False)
    lora = make_lora()
    for t in lora.values():
        t.requires_grad_(True)
    x, idx, w = routing(tokens, seed=tokens)
    x.requires_grad_(True)
    w.requires_grad_(True)
    probe = torch.randn_like(x)
    layout = ExpertsLayout(E, H, I)
    return lambda: torch.autograd.backward(
        EXPERTS_BACKENDS["triton"](x, idx, w, base.gate_up_proj, base.down_proj, F.silu, lora=lora, layout=layout),
        probe)


def profile_layer(tokens: int) -> str:
    """Where the Triton path's layer forward + backward spends its time: the GPU kernels, by total time."""
    from torch.profiler import ProfilerActivity, profile

    fn = triton_layer_step(tokens)
    import time

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        fn()
    issued = (time.perf_counter() - start) / 10
    torch.cuda.synchronize()
    total = (time.perf_counter() - start) / 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    lines = [f"T={tokens}: host issues one forward + backward in {issued * 1e3:.3f} ms, GPU done after {total * 1e3:.3f} ms",
             "kernels in order (us):"]
    lines += [f"  {e.device_time:9.1f}  {e.name[:90]}" for e in kernels]
    lines.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=50))
    return "\n".join(lines)


TILES = {  # (block_n, block_k, num_warps, num_stages) tried per kernel
    "gemm": [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3),
             (256, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (128, 32, 4, 4), (64, 64, 8, 3), (64, 128, 8, 3),
             (64, 64, 8, 4), (128, 64, 8, 4)],
    "lora_backward": [(32, 64, 4, 3), (32, 128, 4, 3), (32, 256, 4, 2), (64, 64, 4, 3), (32, 64, 2, 4)],
    "outer": [(64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (256, 64, 8, 2), (64, 64, 4, 3), (32, 64, 4, 2)],
}


def tune(tokens: int) -> dict:
    """Coordinate search over the training kernels' tiles, per block_m; the layer's fwd + bwd time decides."""
    from peft_shared_moe.ops import kernel_configs, triton_train

    step = triton_layer_step(tokens)

    def layer_ms(entry: dict) -> float:
        configs = kernel_configs.parse_train_configs(entry)
        triton_train._configs = lambda gate_up: configs  # noqa: E731  (this process only)
        try:
            step()
            return time_ms(step)
        except Exception as err:  # a tile that does not fit this card
            print(f"  skipped {entry}: {type(err).__name__}", flush=True)
            return float("inf")

    best_entry, best_ms = None, float("inf")
    for block_m in (64, 128):
        entry = {"block_m": block_m, **{k: dict(zip(("block_n", "block_k", "num_warps", "num_stages"),
                                                    TILES["gemm" if k not in TILES else k][0]))
                                        for k in kernel_configs.TRAIN_KERNELS}}
        ms = layer_ms(entry)
        for kernel in kernel_configs.TRAIN_KERNELS:
            for tile in TILES.get(kernel, TILES["gemm"])[1:]:
                trial = {**entry, kernel: dict(zip(("block_n", "block_k", "num_warps", "num_stages"), tile))}
                trial_ms = layer_ms(trial)
                if trial_ms < ms:
                    entry, ms = trial, trial_ms
            print(f"block_m={block_m} {kernel}: {entry[kernel]} -> {ms:.3f} ms", flush=True)
        if ms < best_ms:
            best_entry, best_ms = entry, ms
    print(f"best {best_ms:.3f} ms: {best_entry}", flush=True)
    return {torch.cuda.get_device_name(): {kernel_configs.shape_key(E, H, I): best_entry}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--skip-steps", action="store_true", help="the layer rows only")
    p.add_argument("--skip-layers", action="store_true", help="the step rows only")
    p.add_argument("--step-rows", nargs="*", type=int, help="only these entries of STEP_ROWS (to split long runs)")
    p.add_argument("--workdir", help="where step rows accumulate (reuse it to add rows across runs)")
    p.add_argument("--tune", action="store_true", help="search the training kernels' tiles first (see above)")
    p.add_argument("--tune-tokens", type=int, default=16384)
    p.add_argument("--tune-out", help="write the tuned JSON entry here")
    p.add_argument("--profile", action="store_true", help="print the Triton path's kernel times at the largest T")
    args = p.parse_args()
    if args.tune:
        import json

        tuned = tune(args.tune_tokens)
        print(json.dumps(tuned, indent=1))
        if args.tune_out:
            Path(args.tune_out).write_text(json.dumps(tuned, indent=1) + "\n")
        from peft_shared_moe.ops import kernel_configs, triton_train

        card, entry = next(iter(tuned.items()))
        chosen = kernel_configs.parse_train_configs(next(iter(entry.values())))
        triton_train._configs = lambda gate_up: chosen  # noqa: E731  the rows below run the tuned tiles
    rows = [] if args.skip_layers else layer_rows(args.tokens)
    if args.profile:
        for tokens in args.tokens:
            print(profile_layer(tokens), flush=True)
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
