"""Training throughput and memory of the adapter under each parallel mode, against one GPU.

Qwen3-30B-A3B shape (hidden 2048, 128 experts of 768, top-8, 32 heads / 4 KV heads), random bf16
weights (nothing downloaded), shared-outer r=32 on the experts and q/k/v/o, AdamW, random tokens.

    python benchmarks/train_distributed.py            # every row of ROWS, each run by torchrun
    torchrun --nproc-per-node 2 benchmarks/train_distributed.py --mode fsdp2 --layers 8 ...   # one row

Modes: single (1 GPU), ddp (torch DDP), fsdp2 (torch `fully_shard` on each decoder layer and the
root, after the adapter is added), tp (`tp_plan="auto"`), ep (transformers' expert parallelism:
`enable_expert_parallel` on 5.17, `ep_size` on >= 5.21), all on one host. In ddp and fsdp2 every
GPU trains on its own batch; in tp and ep the GPUs share one batch, so tokens/s per GPU counts it
once. `impl` "peft_target_parameters" is PEFT's own per-expert LoRA on the same targets (r=32).
Rows go to benchmarks/results/train_distributed-<card>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

R = 32
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# (mode, gpus, layers, seq, batch per GPU (per group for tp/ep), impl, gradient checkpointing)
ROWS = [
    ("single", 1, 8, 2048, 4, "ours", False),
    ("ddp", 2, 8, 2048, 4, "ours", False),
    ("fsdp2", 2, 8, 2048, 4, "ours", False),
    ("tp", 2, 8, 2048, 4, "ours", False),
    ("ep", 2, 8, 2048, 4, "ours", False),
    ("single", 1, 8, 2048, 4, "peft_target_parameters", False),
    ("ddp", 2, 8, 2048, 4, "peft_target_parameters", False),
    ("fsdp2", 2, 8, 2048, 4, "peft_target_parameters", False),
    ("single", 1, 48, 4096, 1, "ours", True),
    ("fsdp2", 2, 48, 4096, 1, "ours", True),
    ("ddp", 4, 8, 2048, 4, "ours", False),
    ("fsdp2", 4, 8, 2048, 4, "ours", False),
    ("tp", 4, 8, 2048, 4, "ours", False),
    ("ep", 4, 8, 2048, 4, "ours", False),
]


def model_config(layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=8192, tie_word_embeddings=False,
    )


def build_on_gpu(layers: int, device: str = "cuda"):
    """Random bf16 weights built on this rank's GPU, or `device` (no float32 copy ever exists)."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM._from_config(model_config(layers), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or "experts" in name:
                p.normal_(0, 0.02)
    return model


def save_checkpoint(layers: int, path: Path) -> None:
    """tp and ep need a checkpoint: transformers shards while loading it."""
    if (path / "config.json").exists():
        return
    model = build_on_gpu(layers)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def add_adapter(model, impl: str):
    from peft import LoraConfig, get_peft_model

    import peft_shared_moe  # noqa: F401
    from peft_shared_moe import SharedMoeLoraConfig

    if impl == "frozen_base":  # no adapter: the backward still runs through every layer, for the inputs
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if impl in ("ours", "ours_torch", "ours_torch_fused"):
        backend = {"ours": "auto", "ours_torch": "torch", "ours_torch_fused": "torch_fused"}[impl]
        config = SharedMoeLoraConfig(r=R, lora_alpha=R, target_modules=["experts", *ATTENTION],
                                     init_lora_weights=False, backend=backend)
    else:
        config = LoraConfig(r=R, lora_alpha=R, target_modules=ATTENTION,
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(model, config)


def parallel_load_kwargs(mode: str, world: int) -> dict:
    from transformers.distributed import DistributedConfig

    if mode == "tp":
        return {"tp_plan": "auto"}
    if "ep_size" in DistributedConfig.__dataclass_fields__:
        return {"distributed_config": DistributedConfig(tp_size=world, ep_size=world)}
    return {"distributed_config": DistributedConfig(tp_size=world, enable_expert_parallel=True)}


def one_run(args) -> None:
    """One row, on every rank torchrun started; rank 0 appends it to args.row_file."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if world > 1:
        dist.init_process_group("nccl")
    if args.mode in ("tp", "ep"):
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16,
                                                     **parallel_load_kwargs(args.mode, world))
        model = add_adapter(model, args.impl)
    else:
        model = add_adapter(build_on_gpu(args.layers), args.impl)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trained = model
    if args.mode == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
    elif args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    shared_batch = args.mode in ("tp", "ep")
    gen = torch.Generator(device="cuda").manual_seed(0 if shared_batch else rank)
    ids = torch.randint(0, 151936, (args.batch, args.seq), device="cuda", generator=gen)

    def step() -> None:
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tokens_per_gpu = args.batch * args.seq / (world if shared_batch else 1)
    row = {"mode": args.mode, "gpus": world, "layers": args.layers, "seq": args.seq, "batch": args.batch,
           "impl": args.impl, "gradient_checkpointing": args.checkpointing,
           "tokens_per_s_per_gpu": round(tokens_per_gpu / seconds, 1), "peak_gib_per_gpu": round(peak.item(), 2),
           "step_s": round(seconds, 4)}
    if rank == 0:
        print(json.dumps(row), flush=True)
        with open(args.row_file, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_all(args, table: list[tuple] = ROWS) -> list[dict]:
    """Each row of `table` (see ROWS) in its own torchrun; writes and returns the results."""
    from benchmarks.common import write_result

    work = Path(args.workdir or tempfile.mkdtemp(prefix="train_distributed-"))
    work.mkdir(parents=True, exist_ok=True)
    row_file = work / "rows.jsonl"
    rows = [r for i, r in enumerate(table) if r[1] <= torch.cuda.device_count() and (args.rows is None or i in args.rows)]
    for mode, gpus, layers, seq, batch, impl, ckpt in rows:
        checkpoint = work / f"checkpoint-{layers}"
        if mode in ("tp", "ep"):
            save_checkpoint(layers, checkpoint)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                   __file__, "--mode", mode, "--layers", str(layers), "--seq", str(seq), "--batch", str(batch),
                   "--impl", impl, "--row-file", str(row_file), "--checkpoint", str(checkpoint)]
        if ckpt:
            command.append("--checkpointing")
        done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line]
            error = (lines or done.stderr.strip().splitlines()[-1:] or ["?"])[0][-400:]
            print(f"FAILED {mode} {gpus} {layers} {impl}: {error}", flush=True)
            with open(row_file, "a") as handle:
                handle.write(json.dumps({"mode": mode, "gpus": gpus, "layers": layers, "seq": seq, "batch": batch,
                                         "impl": impl, "gradient_checkpointing": ckpt, "error": error}) + "\n")
    results = [json.loads(line) for line in row_file.read_text().splitlines()]
    singles = {(r["layers"], r["seq"], r["batch"], r["impl"]): r for r in results if r["mode"] == "single" and "error" not in r}
    for r in results:
        base = singles.get((r["layers"], r["seq"], r["batch"], r["impl"]))
        if r["mode"] != "single" and base and "error" not in r:
            r["scaling_efficiency"] = round(r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"], 3)
            r["memory_vs_single"] = round(r["peak_gib_per_gpu"] / base["peak_gib_per_gpu"], 3)
    print(write_result(args.name, results))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["single", "ddp", "fsdp2", "tp", "ep"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--impl", choices=["ours", "ours_torch", "ours_torch_fused", "peft_target_parameters", "frozen_base"], default="ours")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--row-file")
    p.add_argument("--checkpoint")
    p.add_argument("--workdir", help="where checkpoints and rows go (default: a new temporary folder)")
    p.add_argument("--rows", nargs="*", type=int, help="run only these entries of ROWS (0-based)")
    p.add_argument("--name", default="train_distributed")
    args = p.parse_args()
    if args.mode:
        one_run(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
