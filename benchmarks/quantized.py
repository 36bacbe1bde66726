"""A quantized base (NF4, block-wise FP8) against bf16: one decode layer and whole training steps.

Rows `{"scheme": "bf16" | "nf4" | "fp8", "what", "ms" or "tokens_per_s", "peak_gib"}`:
- `decode_layer_T1_graph`: one Qwen3-30B-A3B experts layer (E=128, H=2048, I=768, top-8) with a
  shared-outer r=32 adapter at T = 1, the Triton kernels replayed from a CUDA graph (ms). Each
  quantized layer's output is checked against the torch path before it is timed.
- `train_step_48l_seq4096`: the full 48-layer shape with random weights, shared-outer LoRA (rank
  `r`, 8 by default) on the experts and attention, AdamW, gradient checkpointing, one sequence of
  4096 tokens (the mean of 3 steps after one untimed), the loss computed in chunks of the
  vocabulary projection (the same for every row): tokens/s, the step's `peak_gib`, and
  `load_peak_gib`, the GPU's peak while building the model. A quantized base is built on the meta device and each experts block is made on the GPU and
  quantized there (`quantize_experts` on that block), so the bf16 experts never exist whole;
  bf16 is built on the GPU directly. Both train on backend "auto" (the Triton training kernels).
Run on the GPU:  python benchmarks/quantized.py [--skip-steps] [--schemes nf4 fp8 bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def sweep_decode_tiles(tokens: int = 1) -> list[dict]:
    """Time the quantized kernels at T = `tokens` over a grid of tiles (one for gate_up and down alike,
    under a CUDA graph), to choose their entries in the tile configs."""
    import itertools

    from peft_shared_moe.ops import triton_experts
    from peft_shared_moe.ops.kernel_configs import KernelConfig

    experts, lora = make_experts("grouped_mm"), make_lora()
    x, idx, w = routing(tokens, seed=1)
    rows = []
    original = triton_experts.kernel_config
    for scheme in ("nf4", "fp8"):
        weights = tuple(SCHEMES[scheme](p.detach()) for p in (experts.gate_up_proj, experts.down_proj))
        for block_n, block_k, warps, stages in itertools.product((16, 32, 64, 128), (32, 64, 128), (2, 4), (2, 4)):
            config = KernelConfig(16, block_n, block_k, warps, stages, 1)
            triton_experts.kernel_config = lambda *a, **k: config  # noqa: E731
            try:
                with torch.no_grad():
                    ms = time_ms(captured(lambda: EXPERTS_BACKENDS["triton"](x, idx, w, *weights, F.silu, lora=lora)))
            except Exception as err:  # a tile that does not fit
                print(scheme, config, type(err).__name__)
                continue
            finally:
                triton_experts.kernel_config = original
            rows.append({"scheme": scheme, "tokens": tokens, "block_n": block_n, "block_k": block_k, "num_warps": warps,
                         "num_stages": stages, "ms": round(ms, 4)})
        best = sorted((r for r in rows if r["scheme"] == scheme), key=lambda r: r["ms"])[:5]
        print(scheme, "best:", *best, sep="\n  ", flush=True)
    return rows


def build_quantized_on_gpu(layers: int, scheme: str):
    """The model on the meta device; each experts block made on the GPU in bf16 and quantized at once,
    then the rest of the model allocated and initialised there."""
    from transformers import Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    from benchmarks.train_distributed import model_config
    from peft_shared_moe import quantize_experts
    from peft_shared_moe.ops import describe_experts

    torch.manual_seed(0)
    config = model_config(layers)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM._from_config(config, dtype=torch.bfloat16)
    for block in [m for m in model.modules() if describe_experts(m) is not None]:
        for p in ("gate_up_proj", "down_proj"):
            weight = torch.empty(getattr(block, p).shape, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
            setattr(block, p, torch.nn.Parameter(weight, requires_grad=False))
        quantize_experts(block, scheme)
    model.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    model.model.rotary_emb = Qwen3MoeRotaryEmbedding(config, device="cuda")  # its buffers were never computed
    return model


def chunked_loss(model, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Next-token loss with the vocabulary projection recomputed per chunk in the backward, so no
    (seq, vocab) float32 logits stay alive: the same for every row."""
    hidden = model.get_base_model().model(input_ids=ids).last_hidden_state[0, :-1]
    labels = ids[0, 1:]
    head = model.get_base_model().lm_head

    def piece(h, y):
        return F.cross_entropy(head(h).float(), y, reduction="sum")

    total = sum(checkpoint(piece, hidden[i:i + chunk], labels[i:i + chunk], use_reentrant=False)
                for i in range(0, labels.shape[0], chunk))
    return total / labels.shape[0]


def step_row(scheme: str, layers: int, seq: int, rank: int, steps: int = 3) -> dict:
    from benchmarks import train_distributed
    from benchmarks.train_distributed import add_adapter, build_on_gpu

    torch.cuda.reset_peak_memory_stats()
    model = build_on_gpu(layers) if scheme == "bf16" else build_quantized_on_gpu(layers, scheme)
    load_peak = torch.cuda.max_memory_allocated() / 2**30
    train_distributed.R = rank
    model = add_adapter(model, "ours")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, 151936, (1, seq), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))

    def step() -> float:
        loss = chunked_loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    loss = step()
    assert loss == loss, f"{scheme}: the loss is NaN"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    row = {"scheme": scheme, "what": f"train_step_{layers}l_seq{seq}", "r": rank,
           "tokens_per_s": round(steps * seq / (time.perf_counter() - start), 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "load_peak_gib": round(load_peak, 2),
           "first_loss": round(loss, 4)}
    del model, optimizer
    torch.cuda.empty_cache()
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--schemes", nargs="*", default=["bf16", "nf4", "fp8"])
    parser.add_argument("--sweep-decode", type=int, nargs="*", help="sweep the quantized tiles at these T, then stop")
    args = parser.parse_args()
    if args.sweep_decode:
        rows = [r for t in args.sweep_decode for r in sweep_decode_tiles(t)]
        print(write_result("quantized_tiles", rows))
        return
    rows = [] if args.skip_decode else decode_rows()
    if not args.skip_steps:
        rows += [step_row(s, args.layers, args.seq, args.rank) for s in args.schemes]
    print(write_result("quantized", rows))


if __name__ == "__main__":
    main()
