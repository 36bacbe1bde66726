"""Where an eager decode step spends host time: our adapter vs our base-only experts.

Eager `generate` at small batch is bound by Python and kernel launches, not by the GPU. This script
prints, for the 4-layer model of benchmarks/generate.py at batch 1: host microseconds per call of one
MoE block and one attention block (base-only vs adapter), and the functions that take the most
host time (cProfile) over a few decode steps with the adapter. Run on the GPU:
    python benchmarks/host_profile.py
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.generate import build_model, randomize_lora  # noqa: E402


def host_us(fn, calls: int = 200) -> tuple[float, float]:
    """Median microseconds per call (host issue, issue until the GPU is done), one call at a time."""
    for _ in range(20):
        fn()
    issue, done = [], []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        issue.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        done.append(time.perf_counter() - start)
    return statistics.median(issue) * 1e6, statistics.median(done) * 1e6


def block_timings(model, label: str, batch: int = 1) -> None:
    layer = model.get_decoder().layers[0]
    x = torch.randn(batch, 1, 2048, device="cuda", dtype=torch.bfloat16)
    position = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    rotary = model.get_decoder().rotary_emb(x, position)
    with torch.no_grad():
        mlp = host_us(lambda: layer.mlp(x))
        attn = host_us(lambda: layer.self_attn(x, position_embeddings=rotary, attention_mask=None)[0])
        proj = host_us(lambda: layer.self_attn.q_proj(x))
    print(f"{label:>12} (batch {batch}, 1 token), us issue / done: MoE block {mlp[0]:.1f} / {mlp[1]:.1f}, "
          f"attention {attn[0]:.1f} / {attn[1]:.1f}, q_proj {proj[0]:.1f} / {proj[1]:.1f}")


def experts_layer_profile() -> None:
    """Host issue time of one experts call (moe_layer.py's shapes) with and without the adapter."""
    import torch.nn.functional as F

    from benchmarks.moe_layer import make_experts, make_lora, routing
    from peft_shared_moe.ops import EXPERTS_BACKENDS

    experts, lora = make_experts("grouped_mm"), make_lora()
    weights = (experts.gate_up_proj, experts.down_proj)
    fn = EXPERTS_BACKENDS["triton"]
    with torch.no_grad():
        for tokens in (1, 8, 64, 512):
            x, idx, w = routing(tokens, seed=tokens)
            with_lora = host_us(lambda: fn(x, idx, w, *weights, F.silu, lora=lora))
            base = host_us(lambda: fn(x, idx, w, *weights, F.silu))
            print(f"experts T={tokens}: us issue / done, adapter {with_lora[0]:.1f} / {with_lora[1]:.1f}, "
                  f"base-only {base[0]:.1f} / {base[1]:.1f}")
        x, idx, w = routing(1, seed=1)
        for label, lora_arg in (("adapter", lora), ("base-only", None)):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(100):
                    fn(x, idx, w, *weights, F.silu, lora=lora_arg)
                torch.cuda.synchronize()
            print(f"experts T=1, {label}, 100 calls, by host time:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        x, idx, w = routing(512, seed=512)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            fn(x, idx, w, *weights, F.silu, lora=lora)
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        print(text.getvalue())


def main() -> None:
    import peft

    experts_layer_profile()
    if "--layer-only" in sys.argv:
        return

    import peft_shared_moe

    model = build_model()
    model.set_experts_implementation("peft_shared_moe")
    block_timings(model, "base-only")
    ours = peft.get_peft_model(model, peft_shared_moe.SharedMoeLoraConfig(r=32, lora_alpha=32))
    randomize_lora(ours)
    block_timings(ours, "adapter")
    ids = torch.randint(0, 151936, (1, 16), device="cuda")
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    ours.generate(**kwargs, max_new_tokens=4, min_new_tokens=4)
    for label, run in (("adapter", ours), ("base-only", None)):
        context = ours.disable_adapter() if run is None else contextlib.nullcontext()
        with context:
            torch.cuda.synchronize()
            start = time.perf_counter()
            ours.generate(**kwargs, max_new_tokens=32, min_new_tokens=32)
            torch.cuda.synchronize()
            print(f"{label}: generate {32 / (time.perf_counter() - start):.1f} tokens/s")
    profiler = cProfile.Profile()
    profiler.enable()
    ours.generate(**kwargs, max_new_tokens=32, min_new_tokens=32)
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        ours.generate(**kwargs, max_new_tokens=8, min_new_tokens=8)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
