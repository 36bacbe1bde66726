#!/usr/bin/env python
"""Generate with a saved shared-outer MoE LoRA adapter, next to the base model's answer.

Why: it is the serving side of ``train_demo.py`` in a dozen lines. Loading needs nothing
but ``import peft_shared_moe`` (which registers the adapter type with PEFT) and the usual
``peft.PeftModel.from_pretrained(base, adapter_dir)``.

    python examples/generate.py [--adapter runs/demo] "reverse : red cat sun ->" ...
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import peft_shared_moe  # noqa: F401  (registers the SHARED_MOE_LORA adapter type with PEFT)

HERE = Path(__file__).resolve().parent
# PEFT 0.21 probes a transformers-5 attribute that is deprecated: upstream noise, not ours.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
DEFAULT_PROMPTS = [
    "reverse : red cat sun ->",
    "reverse : king apple box moon tree ->",
    "reverse : green frog lamp river coin snow ->",
    "copy : red cat sun ->",  # the base's pre-training task: the adapter overrides it too
]


@torch.no_grad()
def greedy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> list[str]:
    """Batched greedy decoding; left padding keeps every prompt flush with its continuation."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [s.strip() for s in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", nargs="*", default=DEFAULT_PROMPTS)
    p.add_argument("--model", default=str(HERE / "tiny-qwen3-moe"), help="local base model directory")
    p.add_argument("--adapter", default="runs/demo", help="directory written by model.save_pretrained")
    p.add_argument("--max-new-tokens", type=int, default=12)
    args = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    # use_kernels=False: offline, transformers >= 5.25 would try to fetch hub kernels for a CUDA model
    base = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, use_kernels=False)
    model = peft.PeftModel.from_pretrained(base, args.adapter).eval()

    adapted = greedy(model, tokenizer, args.prompts, args.max_new_tokens)
    with model.disable_adapter():
        plain = greedy(model, tokenizer, args.prompts, args.max_new_tokens)
    for prompt, a, b in zip(args.prompts, adapted, plain):
        print(f"{prompt}\n  adapter: {a}\n  base   : {b}")


if __name__ == "__main__":
    main()
