#!/usr/bin/env python
"""The main job: fine-tune a Qwen3-MoE model with a shared-outer MoE LoRA adapter, end to end.

It shows, on a laptop CPU in a few minutes and fully offline, everything a user does with
the library: wrap a model with ``peft.get_peft_model(model, SharedMoeLoraConfig(...))``,
train it with the ordinary Hugging Face ``Trainer``, measure the gain on held-out data,
toggle the adapter off with ``disable_adapter()``, save it, and load it back with
``peft.PeftModel.from_pretrained``. The reload is verified logit for logit; the script
exits non-zero if it is not exact, so it doubles as a smoke test.

Defaults use the embedded tiny model and task (``scripts/make_tiny_model.py``): reverse a
list of 3-6 words, scored by exact match of greedy generations on ``test.jsonl``.

    python examples/train_demo.py [--model PATH] [--data DIR] [--output DIR] [--max-steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import peft_shared_moe  # noqa: F401  (importing registers the adapter type with PEFT)
from peft_shared_moe import SharedMoeLoraConfig

HERE = Path(__file__).resolve().parent
# PEFT 0.21 probes a transformers-5 attribute that is deprecated: upstream noise, not ours.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
Example = dict[str, str]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE / "tiny-qwen3-moe"), help="local base model directory")
    p.add_argument("--data", default=str(HERE / "data"), help="directory with train.jsonl and test.jsonl")
    p.add_argument("--output", default="runs/demo", help="where the adapter is saved")
    p.add_argument("--max-steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--per-expert", action="store_true", help="shared_outer=False: every factor per expert")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test lines only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", choices=["nf4", "fp8"], help="hold the experts' base weights in 4-bit NF4 or FP8")
    p.add_argument("--quant-block", type=int, default=None,
                   help="NF4 values per scale (default 64), or the FP8 block side (default: the largest of "
                        "128, 64, 32, ... dividing the expert weights)")
    return p.parse_args()


def read_jsonl(path: Path) -> list[Example]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def encode(tokenizer: PreTrainedTokenizerBase, ex: Example) -> dict[str, list[int]]:
    """prompt + completion + eos, with the loss only on completion + eos (prompt labels are -100)."""
    prompt = tokenizer(ex["prompt"])["input_ids"]  # starts with <bos> when the tokenizer adds one
    answer = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


@dataclass
class PadCollator:
    """Right-pads a batch of `encode` outputs; padded positions are masked and get label -100."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 12,
    batch_size: int = 100,
) -> list[str]:
    """Greedy, batched, left-padded (so every row's next token follows its prompt directly)."""
    model.eval()
    tokenizer.padding_side = "left"
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return outs


@torch.no_grad()
def completion_loss(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: list[Example], batch_size: int = 100
) -> float:
    """Mean cross-entropy per completion token (eos included): the held-out loss."""
    model.eval()
    collate = PadCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = collate([encode(tokenizer, ex) for ex in data[i : i + batch_size]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((labels != -100).sum())
    return total / count


def evaluate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, test: list[Example]) -> dict[str, float]:
    preds = generate(model, tokenizer, [ex["prompt"] for ex in test])
    hits = sum(p.split() == ex["completion"].split() for p, ex in zip(preds, test))
    return {"accuracy": hits / len(test), "loss": completion_loss(model, tokenizer, test)}


def training_arguments(
    args: argparse.Namespace, output_dir: str, arguments_class: type = TrainingArguments, **overrides
) -> TrainingArguments:
    """The optimisation the examples share (`args`: max_steps, batch_size, lr, seed): AdamW, cosine decay
    after a 5 % warmup, no weight decay; the GPU when there is one; no reporting services (offline).
    `arguments_class`: a TrainingArguments subclass, e.g. TRL's SFTConfig."""
    settings = dict(
        output_dir=output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.0,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        remove_unused_columns=False,  # keep "labels": PadCollator needs them
        dataloader_num_workers=0,
    )
    return arguments_class(**{**settings, **overrides})


def load_base(path: str, quantize: str | None = None, block: int | None = None, **kwargs) -> torch.nn.Module:
    """The base model; with `quantize`, its experts are quantized while the checkpoint loads."""
    if quantize:
        from transformers import AutoConfig

        from peft_shared_moe import ExpertsQuantizationConfig

        if quantize == "fp8" and block is None:  # the largest square block dividing every expert weight
            config = AutoConfig.from_pretrained(path, local_files_only=True).get_text_config()
            dims = (config.hidden_size, getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
            block = next((b for b in (128, 64, 32, 16, 8) if all(d % b == 0 for d in dims)), None)
            if block is None:
                raise SystemExit(f"no FP8 block of 128, 64, ... 8 divides the expert sizes {dims}; pass --quant-block")
        kwargs["quantization_config"] = ExpertsQuantizationConfig(quantize, block)
    # use_kernels=False: offline, transformers >= 5.25 would try to fetch hub kernels for a CUDA model
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32, use_kernels=False,
                                                **kwargs)


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()  # keep the console to the progress bar, the losses and the report
    hf_logging.enable_progress_bar()
    out = Path(args.output)

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    train = read_jsonl(Path(args.data) / "train.jsonl")
    test = read_jsonl(Path(args.data) / "test.jsonl")[: args.max_test]
    base = load_base(args.model, args.quantize, args.quant_block)

    print(f"base model: {args.model}{f' (experts held {args.quantize})' if args.quantize else ''}  "
          f"train={len(train)}  test={len(test)}")
    before = evaluate(base, tokenizer, test)
    print(f"base      : accuracy {before['accuracy']:.1%}  held-out loss {before['loss']:.3f}")

    # The library's whole public surface for training: one config, PEFT's usual entry point.
    cfg = SharedMoeLoraConfig(
        r=args.r, lora_alpha=args.lora_alpha, target_modules=None, shared_outer=not args.per_expert
    )  # None = experts + q/k/v/o
    model = peft.get_peft_model(base, cfg)
    model.print_trainable_parameters()

    training_args = training_arguments(
        args, str(out / "trainer"), logging_steps=max(1, args.max_steps // 25), save_strategy="no", disable_tqdm=False
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=[encode(tokenizer, ex) for ex in train],
        data_collator=PadCollator(tokenizer.pad_token_id),
    )
    t0 = time.time()
    trainer.train()
    train_time = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    after = evaluate(model, tokenizer, test)
    print(f"adapted   : accuracy {after['accuracy']:.1%}  held-out loss {after['loss']:.3f}")

    shown = test[:4]
    with_adapter = generate(model, tokenizer, [ex["prompt"] for ex in shown])
    with model.disable_adapter():
        without_adapter = generate(model, tokenizer, [ex["prompt"] for ex in shown])
    for ex, a, b in zip(shown, with_adapter, without_adapter):
        print(
            f"  {ex['prompt']!r}\n    expected {ex['completion'].strip()!r}  adapter {a.strip()!r}  base {b.strip()!r}"
        )

    model.save_pretrained(out)
    adapter_bytes = sum(f.stat().st_size for f in out.glob("adapter_model.*"))

    # Reload into a fresh base and compare logits on a batch: save/load must be lossless.
    reloaded = peft.PeftModel.from_pretrained(load_base(args.model, args.quantize, args.quant_block), out)
    reloaded.eval()
    model.eval()
    batch = PadCollator(tokenizer.pad_token_id)([encode(tokenizer, ex) for ex in test[:32]])
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    max_diff = (a - b).abs().max().item()
    reload_ok = torch.equal(a, b)

    print("\n=== shared-outer MoE LoRA demo report ===")
    print(
        f"adapter          : r={args.r} alpha={args.lora_alpha} shared_outer={cfg.shared_outer} "
        f"targets={cfg.resolved_target_modules()}"
    )
    print(f"exact-match acc  : base {before['accuracy']:.1%} -> adapted {after['accuracy']:.1%}")
    print(f"held-out loss    : base {before['loss']:.3f} -> adapted {after['loss']:.3f}")
    print(
        f"training loss    : first {losses[0]:.3f} -> last {losses[-1]:.3f} ({args.max_steps} steps, "
        f"batch {args.batch_size}, lr {args.lr})"
    )
    print(f"train time       : {train_time:.1f}s")
    print(f"adapter          : {out.resolve()} ({adapter_bytes / 1024:.1f} KiB)")
    print(f"reload check     : {'OK, identical logits' if reload_ok else 'FAILED'} (max |diff| {max_diff:.3g})")
    if after["accuracy"] <= before["accuracy"]:
        print("warning: the adapter did not improve exact-match accuracy")
    return 0 if reload_ok and math.isfinite(after["loss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
