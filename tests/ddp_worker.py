"""One DDP rank for tests/test_lifecycle.py, started by torchrun: a training step of our adapter on
the gloo backend; saves the warnings it saw and its all-reduced gradients."""

from __future__ import annotations

import faulthandler
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from peft import get_peft_model

from peft_shared_moe import SharedMoeLoraConfig
from tests.conftest import input_ids, load


def main(base_path: str, out_dir: str) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # a hang prints where it is and fails the test
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a stuck collective fails, never hangs
    rank = dist.get_rank()
    try:
        torch.manual_seed(0)
        model = get_peft_model(load(base_path), SharedMoeLoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids = input_ids(seed=rank)
            ddp(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"warnings": [str(w.message) for w in caught], "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Everything is saved. Seen here about once in ten runs: freeing the DDP wrapper after the process
    # group is gone blocks forever in the distributed runtime, so leave before any destructor runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
