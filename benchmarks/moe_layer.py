"""One Qwen3-30B-A3B MoE layer (E=128, H=2048, I=768, top-8, bf16, r=32 shared-outer), side by side.

Rows: transformers grouped_mm base without LoRA, PEFT target_parameters per-expert LoRA, our torch
path, our Triton path with LoRA and base-only, and the floor (max of bytes over the measured copy
bandwidth and FLOPs over the measured bf16 matmul rate). Each implementation's output is checked
against our torch path before it is timed. Run on the GPU:  python benchmarks/moe_layer.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import measured_ceilings, time_ms, write_result  # noqa: E402
from peft_shared_moe.factors import EXPERT_FACTORS, factor_shape  # noqa: E402
from peft_shared_moe.ops import EXPERTS_BACKENDS, ExpertLoraFactors  # noqa: E402

E, H, I, K, R = 128, 2048, 768, 8, 32
GRAPH_TOKENS = 512


def captured(fn):
    """fn captured once in a CUDA graph; returns the replay."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def make_experts(impl: str):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    config._experts_implementation = impl
    experts = Qwen3MoeExperts(config).to("cuda", torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    return experts


def make_lora(shared: bool = True) -> ExpertLoraFactors:
    g = lambda *s: torch.randn(*s, device="cuda") * 0.02  # noqa: E731  float32, as PEFT trains them
    return ExpertLoraFactors({f: g(*factor_shape(f, E, H, I, R, shared)) for f in EXPERT_FACTORS}, 1.0)


def routing(tokens: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    router = torch.randn(E, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.05
    probs = torch.softmax((x @ router.T).float(), -1)
    w, idx = torch.topk(probs, K, -1)
    return x, idx, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def peft_target_parameters(experts, lora: ExpertLoraFactors):
    """PEFT's own per-expert route on the same experts, with non-zero random factors (r=32)."""
    from peft import LoraConfig, get_peft_model

    holder = torch.nn.Module()
    holder.experts = experts
    model = get_peft_model(
        holder, LoraConfig(r=R, lora_alpha=R, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    return model.base_model.model.experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 8, 64, 512, 4096, 16384])
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    bandwidth, rate = measured_ceilings()
    print(f"measured: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")

    base = make_experts("grouped_mm")
    lora = make_lora()
    peft_experts = peft_target_parameters(make_experts("grouped_mm"), make_lora(shared=False))
    weights = (base.gate_up_proj, base.down_proj)
    impls = {
        "transformers_grouped_mm": lambda x, i, w: base(x, i, w),
        "peft_target_parameters": lambda x, i, w: peft_experts(x, i, w),
        "ours_torch": lambda x, i, w: EXPERTS_BACKENDS["torch"](x, i, w, *weights, F.silu, lora=lora),
        "ours_triton": lambda x, i, w: EXPERTS_BACKENDS["triton"](x, i, w, *weights, F.silu, lora=lora),
        "ours_triton_base": lambda x, i, w: EXPERTS_BACKENDS["triton"](x, i, w, *weights, F.silu),
    }
    rows = []
    for tokens in args.tokens:
        x, idx, w = routing(tokens, seed=tokens)
        with torch.no_grad():
            reference = impls["ours_torch"](x, idx, w).float()
            for name, check in [("ours_triton", "ours_torch"), ("ours_triton_base", None)]:
                want = reference if check else base(x, idx, w).float()
                err = ((impls[name](x, idx, w).float() - want).norm() / want.norm()).item()
                assert err < 1e-2, f"{name} at T={tokens}: relative error {err:.2e}"
            for name, fn in impls.items():
                ms = time_ms(lambda: fn(x, idx, w))
                rows.append({"impl": name, "T": tokens, "ms": round(ms, 4)})
            if tokens <= GRAPH_TOKENS:  # decode runs under CUDA graphs in serving: time the replays too
                for name in ["transformers_grouped_mm", "ours_triton", "ours_triton_base"]:
                    replay = captured(lambda: impls[name](x, idx, w))
                    rows.append({"impl": name + "_graph", "T": tokens, "ms": round(time_ms(replay), 4)})
        touched = min(E, tokens * K)
        bytes_moved = touched * 3 * H * I * 2 + 2 * tokens * H * 2
        flops = tokens * K * 6 * H * I
        floor_ms = max(bytes_moved / bandwidth, flops / rate) * 1e3
        rows.append({"impl": "floor", "T": tokens, "ms": round(floor_ms, 4)})
        line = "  ".join(f"{r['impl']}={r['ms']:.3f}" for r in rows if r["T"] == tokens)
        print(f"T={tokens:>6}: {line}", flush=True)
    path = write_result("moe_layer", rows, {"ceilings": {"copy_Bps": bandwidth, "bf16_flops": rate}})
    print(f"wrote {path}")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    tokens = list(dict.fromkeys(r["T"] for r in rows))
    ms = {(r["impl"], r["T"]): r["ms"] for r in rows}
    print("| T | " + " | ".join(impls) + " |")
    print("| --- " * (len(impls) + 1) + "|")
    for t in tokens:
        print(f"| {t} | " + " | ".join(f"{ms[(i, t)]:.3f}" if (i, t) in ms else "-" for i in impls) + " |")


if __name__ == "__main__":
    main()
