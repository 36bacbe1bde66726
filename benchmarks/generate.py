"""Tokens/s of `model.generate` on a 4-layer Qwen3-30B-A3B-shaped model (random bf16 weights).

Rows `{"impl", "batch", "mode", "tokens_per_s"}`, for batch 1 and 32 and 128 new tokens (greedy, no
early stop). impl: `no_adapter_transformers` (transformers' default experts), `no_adapter_ours` (our
experts implementation), `ours_triton_adapter` (our shared-outer r=32 adapter on experts + q/k/v/o),
`ours_mixed_adapters` (four such adapters, r = 8, 16, 32 shared-outer and 16 per-expert, one per
sample in turn through `adapter_names`), `peft_target_parameters` (PEFT per-expert r=32 on the same
targets). mode: "eager" (plain `generate`), "compiled" (`cache_implementation="static"`, which makes
transformers compile the forward). Every configuration generates once at full length before it is
timed, so kernel, cuDNN attention plan and compile caches are warm for every row alike.
Run on the GPU:  python benchmarks/generate.py [--modes eager compiled]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402

NEW_TOKENS, PROMPT = 128, 16


def build_model(experts_implementation: str = "grouped_mm"):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
    )
    config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or "experts" in name:
                p.normal_(0, 0.02)
    return model.eval()


def randomize_lora(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.01)


IMPLS = ["no_adapter_transformers", "no_adapter_ours", "ours_triton_adapter", "ours_mixed_adapters", "peft_target_parameters"]
MIXED = {"m8": (8, True), "m16": (16, True), "m32": (32, True), "m16e": (16, False)}  # name: (r, shared_outer)


def tokens_per_second(model, batch: int, mode: str, adapter_names: list[str] | None = None) -> float:
    ids = torch.randint(0, 151936, (batch, PROMPT), device="cuda")
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    if mode == "compiled":
        kwargs["cache_implementation"] = "static"
    if adapter_names is not None:
        kwargs["adapter_names"] = [adapter_names[i % len(adapter_names)] for i in range(batch)]
    model.generate(**kwargs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)  # warm every cache
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(**kwargs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    torch.cuda.synchronize()
    assert out.shape[1] == PROMPT + NEW_TOKENS
    return batch * NEW_TOKENS / (time.perf_counter() - start)


def main() -> None:
    import peft

    import peft_shared_moe  # noqa: F401

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modes", nargs="*", default=["eager", "compiled"])
    parser.add_argument("--compiled-impls", nargs="*", default=["no_adapter_ours", "ours_triton_adapter"])
    parser.add_argument("--impls", nargs="*", default=IMPLS, help="the rows to run (default: all)")
    args = parser.parse_args()
    rows = []

    def record(impl: str, model, adapter_names: list[str] | None = None) -> None:
        if impl not in args.impls:
            return
        for mode in args.modes:
            if mode == "compiled" and impl not in args.compiled_impls:
                continue
            torch._dynamo.reset()
            for batch in (1, 32):
                tps = tokens_per_second(model, batch, mode, adapter_names)
                rows.append({"impl": impl, "batch": batch, "mode": mode, "tokens_per_s": round(tps, 1)})
                print(f"{impl:>28} {mode:>8} batch {batch:>2}: {tps:9.1f} tokens/s", flush=True)

    model = build_model()
    record("no_adapter_transformers", model)
    model.set_experts_implementation("peft_shared_moe")
    record("no_adapter_ours", model)
    ours = peft.get_peft_model(model, peft_shared_moe.SharedMoeLoraConfig(r=32, lora_alpha=32)).eval()
    randomize_lora(ours)
    record("ours_triton_adapter", ours)
    for name, (r, shared) in MIXED.items():
        ours.add_adapter(name, peft_shared_moe.SharedMoeLoraConfig(r=r, lora_alpha=r, shared_outer=shared))
    randomize_lora(ours.eval())
    record("ours_mixed_adapters", ours, adapter_names=list(MIXED))
    del ours, model
    torch.cuda.empty_cache()

    if "peft_target_parameters" not in args.impls:
        return finish(rows)
    model = build_model()
    config = peft.LoraConfig(
        r=32, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    theirs = peft.get_peft_model(model, config).eval()
    randomize_lora(theirs)
    record("peft_target_parameters", theirs)
    finish(rows)


def finish(rows: list[dict]) -> None:
    path = write_result("generate", rows, {"model": "Qwen3-30B-A3B shape, 4 layers, random bf16", "new_tokens": NEW_TOKENS,
                                           "mixed_adapters": {n: {"r": r, "shared_outer": s} for n, (r, s) in MIXED.items()}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
