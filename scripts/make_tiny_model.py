#!/usr/bin/env python
"""Build the demo's embedded assets: a toy task dataset, a tiny tokenizer and a tiny
pre-trained Qwen3-MoE base model.

Why this exists: the library's main demo (``examples/train_demo.py``) has to run offline,
on a laptop CPU, in a few minutes, and still show a *real* effect of fine-tuning. So we
ship (and can always regenerate, bit for bit) a ~1 MB Qwen3-MoE checkpoint that

* is a genuine ``Qwen3MoeForCausalLM`` (sparse MoE layers with 3-D expert weights plus one
  dense MLP layer), loadable with ``from_pretrained`` like any hub model;
* has been pre-trained, so it is a language model and not random noise: it knows the word
  distribution of a small generic corpus and the ``<op> : <words> -> <answer>`` format
  through a *different* operation (``copy``);
* has never seen the task the demo teaches (``reverse``), so it scores ~0% on it and
  LoRA fine-tuning has something clear to show.

Outputs (all deterministic given the seeds below):

* ``examples/data/{train,test}.jsonl``: ``{"prompt": "reverse : red cat sun ->",
  "completion": " sun cat red"}``; test word lists never occur in train.
* ``examples/tiny-qwen3-moe/``: ``config.json``, ``model.safetensors``,
  ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``.

Usage: ``python scripts/make_tiny_model.py [--steps N] [--force-data]``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "examples" / "data"
MODEL_DIR = ROOT / "examples" / "tiny-qwen3-moe"
SEED = 1234

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"

# A small hand-written English vocabulary, split by part of speech so the generic corpus
# can be produced by a tiny grammar. Task word lists are drawn from NOUNS + ADJECTIVES.
DETERMINERS = ["the", "a", "this", "that", "every", "some", "my", "your", "our", "their"]
ADJECTIVES = (
    "red blue green black white small big old young new happy sad quick slow warm cold "
    "soft hard dark bright quiet loud tall short round flat sweet bitter calm wild brave "
    "shy kind clever lazy busy gentle proud strange simple rich poor fresh dry wet empty"
).split()
NOUNS = (
    "cat dog bird fish horse mouse lion tiger bear wolf fox rabbit frog snake duck goat "
    "cow sheep pig owl tree flower river lake hill mountain stone road house door window "
    "table chair book pen cup plate spoon bread apple cake milk tea coffee sun moon star "
    "cloud rain snow wind fire boat ship car train bike ball box bag hat shoe coat key "
    "clock lamp bell drum song king queen child farmer doctor teacher sailor baker garden "
    "forest island city village castle bridge tower market school letter map ring coin"
).split()
VERBS = (
    "sees likes finds takes holds wants needs helps follows watches paints draws opens "
    "closes carries moves pushes pulls builds breaks cleans cooks eats drinks reads writes "
    "sings plays visits meets loves hates calls brings sells buys"
).split()
ADVERBS = "today slowly quickly again often never always softly loudly happily".split()
PREPOSITIONS = "near under over behind beside with without inside outside across".split()
CONNECTIVES = ["and", "but", "so", "because", "while", "then"]
TASK_WORDS = sorted(set(NOUNS + ADJECTIVES))


def generic_sentence(rng: random.Random) -> str:
    """One sentence of the generic pre-training corpus (a tiny probabilistic grammar)."""

    def noun_phrase() -> str:
        parts = [rng.choice(DETERMINERS)]
        if rng.random() < 0.6:
            parts.append(rng.choice(ADJECTIVES))
        parts.append(rng.choice(NOUNS))
        return " ".join(parts)

    clause = f"{noun_phrase()} {rng.choice(VERBS)} {noun_phrase()}"
    if rng.random() < 0.4:
        clause += f" {rng.choice(PREPOSITIONS)} {noun_phrase()}"
    if rng.random() < 0.3:
        clause += f" {rng.choice(ADVERBS)}"
    if rng.random() < 0.3:
        clause += f" {rng.choice(CONNECTIVES)} {noun_phrase()} {rng.choice(VERBS)} {noun_phrase()}"
    return clause + " ."


def word_list(rng: random.Random, lo: int = 3, hi: int = 6) -> list[str]:
    """Distinct words, so that each answer is unambiguous and never a palindrome."""
    return rng.sample(TASK_WORDS, rng.randint(lo, hi))


def task_example(words: list[str]) -> dict[str, str]:
    """The task the demo fine-tunes for: reverse a list of words."""
    return {"prompt": f"reverse : {' '.join(words)} ->", "completion": " " + " ".join(reversed(words))}


def make_dataset(n_train: int = 4000, n_test: int = 200) -> None:
    """Write train/test JSONL with disjoint word lists."""
    rng = random.Random(SEED)
    seen: set[tuple[str, ...]] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < n_train + n_test:
        words = word_list(rng)
        if tuple(words) in seen:
            continue
        seen.add(tuple(words))
        rows.append(task_example(words))
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:n_train]), ("test", rows[n_train:])):
        with open(DATA_DIR / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in part)


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pretraining_corpus(n_docs: int) -> list[str]:
    """Generic text + the *copy* operation in the task's format. No reversed answer appears.

    Task word lists for ``copy`` are sampled fresh, so the base model sees the same word
    distribution as the task inputs, but never the ``reverse`` operation or its answers.
    """
    rng = random.Random(SEED + 1)
    docs = []
    for _ in range(n_docs):
        if rng.random() < 0.5:
            docs.append(" ".join(generic_sentence(rng) for _ in range(rng.randint(1, 2))))
        else:
            words = " ".join(word_list(rng, 2, 6))
            docs.append(f"copy : {words} -> {words}")
    return docs


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (one token per word / punctuation run), ``<bos>`` prepended.

    Word level keeps the reversal task well posed (one word = one token) and the vocabulary
    small (~220 tokens) while still being a standard ``tokenizers`` pipeline.
    """
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, BOS, EOS, UNK], min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,  # dense MLP of the mlp_only layer
        moe_intermediate_size=32,
        num_hidden_layers=4,
        mlp_only_layers=[1],
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(SEED)
    return Qwen3MoeForCausalLM(config)


def pretrain(
    model: Qwen3MoeForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    docs: list[str],
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
) -> list[float]:
    """Plain full-parameter causal-LM training with cosine decay; returns the loss curve."""
    enc = [tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in docs]
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="pre-training", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(enc), (batch_size,), generator=gen).tolist()
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(enc[i])] = torch.tensor(enc[i])
            mask[row, : len(enc[i])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="pre-training steps")
    parser.add_argument("--force-data", action="store_true", help="regenerate examples/data")
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help="where to save model + tokenizer")
    args = parser.parse_args()

    torch.set_num_threads(2)  # same thread count -> same float reductions -> same weights
    random.seed(SEED)
    torch.manual_seed(SEED)

    if args.force_data or not (DATA_DIR / "train.jsonl").exists():
        make_dataset()
    train, test = read_jsonl(DATA_DIR / "train.jsonl"), read_jsonl(DATA_DIR / "test.jsonl")
    docs = pretraining_corpus(20000)

    # The tokenizer sees all text (so every task word has a token), the model only `docs`.
    vocab_text = docs + [r["prompt"] + r["completion"] for r in train + test]
    vocab_text += [" ".join(DETERMINERS + ADJECTIVES + NOUNS + VERBS + ADVERBS + PREPOSITIONS + CONNECTIVES)]
    tokenizer = build_tokenizer(vocab_text)
    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab={len(tokenizer)} params={n_params / 1e6:.3f}M")

    t0 = time.time()
    losses = pretrain(model, tokenizer, docs, args.steps)
    print(
        f"pre-training: {args.steps} steps in {time.time() - t0:.0f}s, "
        f"loss {losses[0]:.3f} -> {sum(losses[-50:]) / 50:.3f}"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    # transformers 5 records its new class name; the classic alias loads in 4.x and 5.x alike.
    tok_cfg_path = args.out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"saved to {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
