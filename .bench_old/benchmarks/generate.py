"""Tokens/s of `model.generate` on a 4-layer Qwen3-30B-A3B-shaped model (random bf16 weights).

Rows, for batch 1 and 32 and 128 new tokens (greedy, no early stop): no adapter (transformers'
default experts), no adapter on our experts implementation, our shared-outer r=32 adapter on
experts + attention (the Triton path), and PEFT target_parameters per-expert r=32 on the same
targets. Run on the GPU:  python benchmarks/generate.py
"""

from __future__ import annotations

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


def tokens_per_second(model, batch: int) -> float:
    ids = torch.randint(0, 151936, (batch, PROMPT), device="cuda")
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    model.generate(**kwargs, max_new_tokens=8, min_new_tokens=8)  # warm up kernels and caches
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(**kwargs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    torch.cuda.synchronize()
    assert out.shape[1] == PROMPT + NEW_TOKENS
    return batch * NEW_TOKENS / (time.perf_counter() - start)


def main() -> None:
    import peft

    import peft_shared_moe  # noqa: F401

    rows = []

    def record(impl: str, model) -> None:
        for batch in (1, 32):
            tps = tokens_per_second(model, batch)
            rows.append({"impl": impl, "batch": batch, "tokens_per_s": round(tps, 1)})
            print(f"{impl:>32} batch {batch:>2}: {tps:9.1f} tokens/s", flush=True)

    model = build_model()
    record("no_adapter_transformers", model)
    model.set_experts_implementation("peft_shared_moe")
    record("no_adapter_ours", model)
    ours = peft.get_peft_model(model, peft_shared_moe.SharedMoeLoraConfig(r=32, lora_alpha=32))
    randomize_lora(ours)
    record("ours_triton_adapter", ours)
    del ours, model
    torch.cuda.empty_cache()

    model = build_model()
    config = peft.LoraConfig(
        r=32, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    theirs = peft.get_peft_model(model, config)
    randomize_lora(theirs)
    record("peft_target_parameters", theirs)
    path = write_result("generate", rows, {"model": "Qwen3-30B-A3B shape, 4 layers, random bf16", "new_tokens": NEW_TOKENS})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
