"""One rank of a data-parallel run for tests/test_data_parallel.py, started by torchrun or accelerate launch.

`trainer OUT_DIR [example args]`: examples/train_distributed.py's own Trainer (`build_trainer`) and
save (`save_adapter`), plus what the test needs to see from every rank: the adapter this rank holds
after training and at its first step, the steps this process ran, logits on a fixed batch, and (on
rank 0) logits of the saved adapter reloaded on one device.

`fsdp2 OUT_DIR BASE_PATH`: FSDP2 through torch's own `fully_shard` (accelerate shards the same way:
every decoder layer, then the root), trained with a plain loop against a one-device reference on the
global batch; then the saves: from every rank (one whole adapter), from rank 0 alone (must refuse
quickly), and rank 0's local shards as an adapter (for the loader to refuse).

Each rank writes `OUT_DIR/rank{r}.json` (numbers) and `OUT_DIR/rank{r}.pt` (tensors).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from train_demo import PadCollator, encode, load_base, read_jsonl  # noqa: E402
from train_distributed import build_trainer, parse_args, save_adapter  # noqa: E402

from peft_shared_moe import SharedMoeLoraConfig  # noqa: E402
from peft_shared_moe.parallel import IncompleteSaveError, needs_gather  # noqa: E402
from tests.conftest import input_ids, load, randomize_adapter  # noqa: E402
from tests.parallel_worker import full, rel  # noqa: E402


def whole_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Relative difference of two adapters taken as one vector."""
    return rel(torch.cat([a[k].flatten() for k in sorted(b)]), torch.cat([b[k].flatten() for k in sorted(b)]))


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters under their saved names, whole (gathering FSDP2 shards: every rank calls it)."""
    return {n.replace(".default", ""): full(p) for n, p in model.named_parameters() if p.requires_grad}


class StepLog(TrainerCallback):
    """The steps this process runs, and the adapter it holds when its first step begins (after any resume)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.first: dict[str, torch.Tensor] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not self.first:
            self.first = adapter_tensors(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def probe_batch(tokenizer_dir: str, device: torch.device) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    rows = read_jsonl(ROOT / "examples" / "data" / "test.jsonl")[:6]
    batch = PadCollator(tokenizer.pad_token_id)([encode(tokenizer, ex) for ex in rows])
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}


@torch.no_grad()
def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**batch).logits.float().cpu()


def trainer_run(out_dir: Path, argv: list[str]) -> tuple[dict, dict]:
    args = parse_args(argv)
    trainer = build_trainer(args)
    log = StepLog()
    trainer.add_callback(log)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    rank = trainer.args.process_index
    adapter = adapter_tensors(trainer.model)
    batch = probe_batch(args.model, trainer.args.device)
    logits = logits_of(trainer.model, batch)  # every rank: an FSDP2 forward is collective
    sharded = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad and needs_gather(p))
    report = save_adapter(trainer, args.output)
    result = {
        "rank": rank,
        "world": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp": trainer.is_fsdp_enabled,
        "sharded_factors": len(sharded),
        "steps_run": log.steps,
        "report": report,
    }
    if report is not None:  # rank 0: the saved adapter on a fresh base on this one device
        reloaded = PeftModel.from_pretrained(load_base(args.model).to(trainer.args.device), args.output)
        result["reloaded_logits_rel"] = rel(logits_of(reloaded, batch), logits)
    return result, {"adapter": adapter, "first": log.first, "logits": logits}


def fsdp2_run(out_dir: Path, base_path: str) -> tuple[dict, dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = SharedMoeLoraConfig(r=4, lora_alpha=8)
    ids = input_ids(batch=2 * world, length=9)  # the global batch; the reference trains on all of it
    mine = ids[2 * rank : 2 * rank + 2]  # equal parts, every token labelled: the mean of the ranks' means is its mean

    def fresh():
        model = get_peft_model(load(base_path, dtype=torch.float32), config)
        randomize_adapter(model, seed=1)  # B != 0: every factor gets a gradient from the first step
        return model

    def train(model, parts):
        """3 AdamW steps; each step's gradient is the mean over `parts` (equal micro-batches)."""
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        for _ in range(3):
            opt.zero_grad()
            for part in parts:
                (model(input_ids=part, labels=part).loss / len(parts)).backward()
            opt.step()

    # One process: the whole batch at once, and the ranks' parts accumulated (the same sums in the same order).
    whole, accumulated, model = fresh(), fresh(), fresh()
    start = adapter_tensors(whole)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    train(whole, [ids])
    train(accumulated, list(ids.split(2)))
    train(model, [mine])
    ref, acc, got = adapter_tensors(whole), adapter_tensors(accumulated), adapter_tensors(model)
    result = {
        "rank": rank,
        "sharded_factors": sum(needs_gather(p) for p in model.parameters() if p.requires_grad),
        "trained_whole_rel": whole_rel(got, ref),  # one batch: other float32 sums (see the test's docstring)
        "trained_accumulated_rel": max(rel(got[k], acc[k]) for k in acc),  # worst factor
        "moved_rel": min(rel(ref[k], start[k]) for k in ref),
    }
    tensors = {"adapter": got, "reference_logits": logits_of(whole, {"input_ids": ids})}

    # every rank saves, rank 0 writes: one file of whole tensors
    model.save_pretrained(out_dir / "adapter", is_main_process=rank == 0)
    dist.barrier()

    # rank 0 alone: must refuse within PEFT_SHARED_MOE_SAVE_TIMEOUT, naming the missing rank, and write nothing
    if rank == 0:
        t0 = time.monotonic()
        try:
            model.save_pretrained(out_dir / "rank0_alone")
            result["alone_error"] = None
        except IncompleteSaveError as error:
            result["alone_error"] = str(error)
        result["alone_seconds"] = time.monotonic() - t0
        result["alone_files"] = sorted(p.name for p in (out_dir / "rank0_alone").glob("*"))
        # what a save that skipped the gather would write: rank 0's local shards under the saved names
        local = {
            n.replace(".default", ""): p.to_local().detach().contiguous().clone()
            for n, p in model.named_parameters() if p.requires_grad
        }
        (out_dir / "rank0_shards").mkdir()
        save_file(local, out_dir / "rank0_shards" / "adapter_model.safetensors")
        (out_dir / "rank0_shards" / "adapter_config.json").write_text(
            (out_dir / "adapter" / "adapter_config.json").read_text()
        )
    dist.barrier()  # no collective runs while rank 0 waits for the others in the store
    dist.destroy_process_group()
    return result, tensors


def main(mode: str, out_dir: str, *rest: str) -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a hang prints where it is and fails the test
    out = Path(out_dir)
    if mode == "trainer":
        result, tensors = trainer_run(out, list(rest))
    elif mode == "fsdp2":
        result, tensors = fsdp2_run(out, rest[0])
    else:
        raise ValueError(f"mode {mode!r}: expected 'trainer' or 'fsdp2'")
    rank = result["rank"]
    torch.save(tensors, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # Everything is saved; leave before destructors run (freeing a DDP wrapper after the process group
    # can block, see tests/ddp_worker.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
