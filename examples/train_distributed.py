#!/usr/bin/env python
"""Data-parallel fine-tuning (DDP or FSDP2) of a shared-outer MoE LoRA adapter with the Hugging Face Trainer.

The same file runs as one process or as every rank of a data-parallel job; the Trainer (through
accelerate) picks the strategy from how it was launched:

    python examples/train_distributed.py                                  # one process
    torchrun --nproc-per-node 2 examples/train_distributed.py             # DDP
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_distributed.py
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/train_distributed.py
    torchrun --nproc-per-node 2 examples/train_distributed.py --trainer trl      # TRL's SFTTrainer, DDP
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel tp      # tensor parallel
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel ep      # expert parallel

Each rank reads its own slice of every global batch (batch x grad-accum x ranks rows per step), and
the loss is the mean over all ranks' completion tokens (Trainer's `average_tokens_across_devices`):
2 ranks of batch b train the same adapter as one process accumulating 2 micro-batches of b (bit for
bit under DDP on a CPU), and, up to float32 rounding, as one process of batch 2b. Defaults use the
embedded tiny model and task (see examples/train_demo.py); everything is offline.

At the end every rank calls `save_pretrained` (under FSDP2 the factors are shards, and gathering
them is collective); rank 0 writes one adapter of whole tensors (safetensors, transformers 5's only
format) and prints one JSON line: the last logged training loss, the number of tensors in the
file and its sha256. Under torchrun, spell the LoRA rank `--lora-r`: torchrun's parser takes a bare
`--r` for an abbreviation of its own options.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import peft
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import HERE, PadCollator, encode, load_base, read_jsonl, training_arguments  # noqa: E402

from peft_shared_moe import SharedMoeLoraConfig  # noqa: E402  (importing registers the adapter type)

ADAPTER_FILE = "adapter_model.safetensors"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE / "tiny-qwen3-moe"), help="local base model directory")
    p.add_argument("--data", default=str(HERE / "data" / "train.jsonl"), help="train.jsonl, or a directory holding it")
    p.add_argument("--output", default="runs/distributed", help="checkpoints and the final adapter")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="per device and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step and device")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lora-r", "--r", dest="r", type=int, default=16, help="LoRA rank (--lora-r under torchrun)")
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-steps", type=int, default=0, help="write a checkpoint every N steps (0: none)")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output")
    p.add_argument("--trainer", choices=["hf", "trl"], default="hf",
                   help="transformers' Trainer on our tokenization, or TRL's SFTTrainer on the raw prompt/completion rows")
    p.add_argument("--parallel", choices=["tp", "ep"], default=None,
                   help="under torchrun: load the base tensor parallel (tp_plan='auto') or expert parallel")
    return p.parse_args(argv)


def train_file(data: str) -> Path:
    path = Path(data)
    return path / "train.jsonl" if path.is_dir() else path


def parallel_load_kwargs(parallel: Optional[str]) -> dict:
    """How transformers shards the base while loading it; the adapter follows (docs/PARALLEL.md)."""
    if parallel is None:
        return {}
    if parallel == "tp":
        return {"tp_plan": "auto"}
    from transformers.distributed import DistributedConfig

    world = int(os.environ.get("WORLD_SIZE", 1))
    if "ep_size" in DistributedConfig.__dataclass_fields__:  # transformers >= 5.21
        return {"distributed_config": DistributedConfig(tp_size=world, ep_size=world)}
    return {"distributed_config": DistributedConfig(tp_size=world, enable_expert_parallel=True)}


def sft_trainer_parts(args: argparse.Namespace, tokenizer) -> tuple[type, type, dict, dict]:
    """TRL's SFTTrainer on the prompt/completion rows: TRL tokenizes them and computes the loss on the
    completion only (its default for such rows), as our own `encode` does for the Trainer.
    Returns the trainer and arguments classes, the data, and SFTConfig's own settings."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = Dataset.from_list(read_jsonl(train_file(args.data)))
    settings = {"remove_unused_columns": True, "packing": False}  # TRL's collator reads its own columns
    return SFTTrainer, SFTConfig, {"train_dataset": rows, "processing_class": tokenizer}, settings


def build_trainer(args: argparse.Namespace) -> Trainer:
    """The adapter on the base model, and a Trainer that runs it on however many ranks were launched."""
    # Same seed on every rank, so every rank draws the same initial adapter: DDP would broadcast rank 0's
    # anyway, but FSDP2 shards each rank's own copy.
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    cfg = SharedMoeLoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=None)  # experts + q/k/v/o
    model = peft.get_peft_model(load_base(args.model), cfg)
    if args.trainer == "trl":
        trainer_class, arguments_class, data, own_settings = sft_trainer_parts(args, tokenizer)
    else:
        trainer_class, arguments_class, own_settings = Trainer, TrainingArguments, {}
        data = {
            "train_dataset": [encode(tokenizer, ex) for ex in read_jsonl(train_file(args.data))],
            "data_collator": PadCollator(tokenizer.pad_token_id),
        }

    training_args = training_arguments(
        args,
        args.output,
        arguments_class,
        gradient_accumulation_steps=args.grad_accum,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        # The loss is summed over every rank's completion tokens and divided by their total, so N ranks of
        # batch b compute the gradient of one batch of N*b (the default; stated because it is what makes it so).
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,  # every factor takes part in every step (unrouted experts: zero grads)
        disable_tqdm=True,
        **own_settings,
    )
    trainer = trainer_class(model=model, args=training_args, **data)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        # accelerate enables FSDP for accelerator devices only; elsewhere it would quietly run DDP.
        raise RuntimeError(
            f"the launch asked for FSDP, but accelerate runs this job as {trainer.accelerator.distributed_type} "
            f"on the {trainer.args.device.type}: FSDP needs GPUs; on a CPU use examples/accelerate/ddp.yaml or torchrun"
        )
    return trainer


def save_adapter(trainer: Trainer, output: str) -> Optional[dict]:
    """Save the adapter from every rank; rank 0 writes it and returns what it wrote (None elsewhere).

    All ranks take part: under FSDP2 every factor is a DTensor shard, and the tuner gathers them into
    whole tensors, a collective, so the file holds the full adapter once.
    """
    main_process = trainer.is_world_process_zero()
    trainer.model.save_pretrained(output, is_main_process=main_process)
    if not main_process:
        return None
    path = Path(output) / ADAPTER_FILE
    with safe_open(path, framework="pt") as f:
        keys = len(list(f.keys()))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else None,
        "adapter_keys": keys,
        "adapter_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "adapter": str(path),
    }


def train_sharded(args: argparse.Namespace) -> Optional[dict]:
    """Tensor / expert parallel: every rank holds part of each layer and all see the same batch.

    accelerate hands a model transformers sharded to the Trainer only through its
    `ParallelismConfig` on GPUs, so this path is a plain loop over the same data, collator and
    AdamW; the adapter's shards, their gradient sums and the gathered save are the library's.
    """
    import torch.distributed as dist

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    rows = [encode(tokenizer, ex) for ex in read_jsonl(train_file(args.data))]
    cfg = SharedMoeLoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=None)
    model = peft.get_peft_model(load_base(args.model, **parallel_load_kwargs(args.parallel)), cfg)
    device = next(p for p in model.parameters() if p.requires_grad).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    collate = PadCollator(tokenizer.pad_token_id)
    loss = torch.tensor(float("nan"))
    for step in range(args.max_steps):
        start = step * args.batch_size % max(len(rows) - args.batch_size, 1)
        batch = {k: v.to(device) for k, v in collate(rows[start:start + args.batch_size]).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    main_process = dist.get_rank() == 0
    model.save_pretrained(args.output, is_main_process=main_process)  # every rank: gathering is collective
    dist.barrier()
    if not main_process:
        return None
    path = Path(args.output) / ADAPTER_FILE
    with safe_open(path, framework="pt") as f:
        keys = len(list(f.keys()))
    return {"parallel": args.parallel, "world_size": dist.get_world_size(), "steps": args.max_steps,
            "final_loss": loss.item(), "adapter_keys": keys,
            "adapter_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "adapter": str(path)}


def main() -> int:
    args = parse_args()
    hf_logging.set_verbosity_error()
    if args.parallel:
        report = train_sharded(args)
        if report is not None:
            print(json.dumps(report), flush=True)
        return 0
    trainer = build_trainer(args)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    report = save_adapter(trainer, args.output)
    if report is not None:
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
