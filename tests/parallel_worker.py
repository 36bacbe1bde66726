"""One rank of a tensor- or expert-parallel run for tests/test_parallel.py, started by torchrun.

Every rank builds the same adapter on one device (the reference) and on the model transformers
shards (`mode`: "tp" = tp_plan="auto", "tp_config" = DistributedConfig(tp_size=N) (transformers >= 5.25
leaves the experts whole there), "tp_experts" = experts split along I as well, "ep" = expert parallel,
"ep_all_reduce" = expert parallel on one batch, "fsdp_config" / "ep_fsdp" / "tp_fsdp" = FSDP alone, with EP, with TP; see `parallel_kwargs`), then compares, in float32: logits, adapter gradients, the adapter after 3 AdamW steps,
greedy generate, and the adapter saved from the sharded model reloaded on one device. It writes
the measured differences to `out_dir/rank{r}.json`; the test asserts on them.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import transformers
from packaging.version import Version
from peft import PeftModel, get_peft_model

from peft_shared_moe import SharedMoeLoraConfig
from peft_shared_moe.parallel import is_dtensor
from tests.conftest import input_ids, load, randomize_adapter

TARGETS = ["experts", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parallel_kwargs(mode: str, world: int) -> dict:
    from transformers.distributed import DistributedConfig

    if mode == "tp":
        return {"tp_plan": "auto"}
    if mode == "tp_config":
        return {"distributed_config": DistributedConfig(tp_size=world)}
    if mode == "fsdp_config":  # transformers shards for data parallelism before the adapter exists
        return {"distributed_config": DistributedConfig(fsdp_size=world)}
    if mode == "ep_fsdp":  # experts on a 2D (efsdp, ep) mesh, attention FSDP: every rank its own batch
        return {"distributed_config": DistributedConfig(fsdp_size=world, ep_size=world)}
    if mode == "tp_fsdp":  # a 2D (fsdp, tp) mesh: TP pairs, data parallel across them
        return {"distributed_config": DistributedConfig(tp_size=2, fsdp_size=world // 2)}
    if mode == "tp_experts":  # experts split along I too: the default plan before 5.25, asked for explicitly after
        if Version(transformers.__version__) < Version("5.25"):
            return {"distributed_config": DistributedConfig(tp_size=world)}
        plan = {"layers.*.mlp.experts.gate_up_proj": "packed_colwise", "layers.*.mlp.experts.down_proj": "rowwise",
                "layers.*.mlp.experts": "moe_tp_experts"}
        return {"distributed_config": DistributedConfig(tp_size=world, tp_plan={f"model.{k}": v for k, v in plan.items()})}
    if mode == "ep_all_reduce":  # every rank the whole batch, routes to other ranks' experts masked (>= 5.24)
        return {"distributed_config": DistributedConfig(tp_size=world, ep_size=world, ep_implementation="all_reduce")}
    if mode == "ep":
        fields = DistributedConfig.__dataclass_fields__
        if "ep_size" in fields:  # transformers >= 5.21: experts on an EP mesh, attention tensor parallel
            return {"distributed_config": DistributedConfig(tp_size=world, ep_size=world)}
        return {"distributed_config": DistributedConfig(tp_size=world, enable_expert_parallel=True)}
    raise ValueError(mode)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu().clone()


def adapter_tensors(model, grads: bool = False) -> dict[str, torch.Tensor]:
    found = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = p.grad if grads else p
            found[name] = full(value) if value is not None else None
    return found


def train_steps(model, ids, steps: int = 3) -> None:
    """3 AdamW steps on `ids`; lr 1e-2 so that every factor moves well past float32 noise."""
    # foreach=True: the multi-tensor kernels GPUs use by default, which refuse plain tensors beside DTensors
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def replica_spread(model) -> float:
    """Largest difference between ranks of any replicated (or unsharded) factor: 0.0 when bit-identical."""
    worst = 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_dtensor(p) and not all(pl.is_replicate() for pl in p.placements):
            continue
        mine = (p.to_local() if is_dtensor(p) else p).detach().contiguous()
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        worst = max(worst, max((g - gathered[0]).abs().max().item() for g in gathered))
    return worst


def refusals(base_path: str, out_dir: str) -> dict:
    """Layouts the adapter cannot follow exactly: each refused at get_peft_model, naming why, and
    the model left without any adapter layer."""
    from peft_shared_moe.parallel import ParallelLayoutError
    from peft_shared_moe.tuners import SharedMoeLoraLayer
    from tests.conftest import qwen3_moe_config, save_random_model

    found: dict = {}
    uneven_path = os.path.join(out_dir, "uneven")
    if dist.get_rank() == 0:  # an expert intermediate size of 15 cannot split in halves
        save_random_model(qwen3_moe_config(moe_intermediate_size=15), uneven_path)
    dist.barrier()
    cases = {
        "uneven": (uneven_path, parallel_kwargs("tp_experts", dist.get_world_size()), SharedMoeLoraConfig(r=4)),
        "dropout": (base_path, {"tp_plan": "auto"}, SharedMoeLoraConfig(r=4, lora_dropout=0.1)),
    }
    from transformers.distributed import DistributedConfig

    if "ep_size" not in DistributedConfig.__dataclass_fields__:  # 5.17's EP leaves attention whole, one batch
        cases["dropout_whole"] = (base_path, {"distributed_config": DistributedConfig(
            tp_size=dist.get_world_size(), enable_expert_parallel=True)}, SharedMoeLoraConfig(r=4, lora_dropout=0.1))
    for name, (path, kwargs, config) in cases.items():
        model = load(path, dtype=torch.float32, **kwargs)
        try:
            get_peft_model(model, config)
            found[name] = None
        except ParallelLayoutError as error:
            found[name] = str(error)
        found[name + "_untouched"] = not any(isinstance(m, SharedMoeLoraLayer) for m in model.modules())
    return found


def main(mode: str, base_path: str, out_dir: str) -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a hang prints where it is and fails the test
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    here = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    result: dict = {"mode": mode, "transformers": transformers.__version__, "world": world}
    config = SharedMoeLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    ids = input_ids(batch=4, length=9).to(here)  # the global batch, which the reference trains on
    # Data parallel: each group of ranks trains on its own equal part; the mean gradient is the global batch's.
    data_groups = {"fsdp_config": world, "ep_fsdp": world, "tp_fsdp": world // 2}.get(mode, 1)  # ranks of one group share a batch
    group = rank // (world // data_groups)
    per_group = ids.shape[0] // data_groups
    rows = slice(group * per_group, (group + 1) * per_group)
    ids_here = ids[rows]
    try:
        if mode == "refusals":
            result.update(refusals(base_path, out_dir))
            return
        # bf16 base: the factors are upcast to float32 (PEFT's default), shards included, and train
        half = get_peft_model(load(base_path, dtype=torch.bfloat16, **parallel_kwargs(mode, world)), config)
        result["bf16_factor_dtypes"] = sorted({
            f"{p.dtype}/{(p.to_local() if is_dtensor(p) else p).dtype}" for p in half.parameters() if p.requires_grad
        })
        train_steps(half, ids_here, steps=1)
        result["bf16_replica_spread"] = replica_spread(half)  # the upcast kept every replica in step
        del half
        torch.manual_seed(0)
        reference = get_peft_model(load(base_path, dtype=torch.float32).to(here), config)
        randomize_adapter(reference, seed=1)
        adapter_dir = os.path.join(out_dir, "start")
        if rank == 0:
            reference.save_pretrained(adapter_dir)
        dist.barrier()

        # the same adapter, created on the sharded model and then loaded into it
        torch.manual_seed(100 + rank)  # each rank draws other initial values: creation must align them
        created = get_peft_model(load(base_path, dtype=torch.float32, **parallel_kwargs(mode, world)), config)
        result["created_replica_spread"] = replica_spread(created)
        del created
        sharded = PeftModel.from_pretrained(
            load(base_path, dtype=torch.float32, **parallel_kwargs(mode, world)), adapter_dir, is_trainable=True
        )
        result["sharded_factors"] = sorted(
            n for n, p in sharded.named_parameters() if p.requires_grad and is_dtensor(p)
            and not all(pl.is_replicate() for pl in p.placements)
        )

        # our experts implementation, base only, inside the same parallel hooks
        kwargs = {**parallel_kwargs(mode, world), "experts_implementation": "peft_shared_moe"}
        with torch.no_grad():
            base_par = load(base_path, dtype=torch.float32, **kwargs)(input_ids=ids_here).logits
            with reference.disable_adapter():
                base_ref = reference(input_ids=ids).logits[rows]
        result["base_only_logits_rel"] = rel(full(base_par), base_ref.cpu())

        out_ref = reference(input_ids=ids, labels=ids)
        out_par = sharded(input_ids=ids_here, labels=ids_here)
        result["logits_rel"] = rel(full(out_par.logits), out_ref.logits[rows].detach().cpu())
        out_ref.loss.backward()
        out_par.loss.backward()
        g_ref, g_par = adapter_tensors(reference, grads=True), adapter_tensors(sharded, grads=True)
        result["grad_keys_equal"] = sorted(g_ref) == sorted(g_par)
        result["grad_rel"] = max(rel(g_par[k], g_ref[k]) for k in g_ref)
        reference.zero_grad()
        sharded.zero_grad()

        before = adapter_tensors(reference)
        train_steps(reference, ids)
        train_steps(sharded, ids_here)
        a_ref, a_par = adapter_tensors(reference), adapter_tensors(sharded)
        result["trained_rel"] = max(rel(a_par[k], a_ref[k]) for k in a_ref)
        result["moved_rel"] = min(rel(a_ref[k], before[k]) for k in a_ref)  # the steps changed every factor
        result["trained_replica_spread"] = replica_spread(sharded)

        with torch.no_grad():
            gen_ref = reference.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False)
            gen_par = sharded.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False)
        result["generate_equal"] = gen_ref.tolist() == gen_par.tolist()

        saved_dir = os.path.join(out_dir, "trained")
        sharded.save_pretrained(saved_dir, is_main_process=rank == 0)  # every rank: the gather is collective
        with torch.no_grad():
            logits_sharded = full(sharded(input_ids=ids).logits)
        trained = {k.replace(".default", ""): v for k, v in adapter_tensors(sharded).items()}
        dist.barrier()
        if rank == 0:
            from safetensors.torch import load_file

            saved = load_file(os.path.join(saved_dir, "adapter_model.safetensors"))
            result["saved_keys_equal"] = sorted(saved) == sorted(trained)
            result["saved_max_abs_diff"] = max(
                (saved[k] - v).abs().max().item() for k, v in trained.items()
            )
            single = PeftModel.from_pretrained(load(base_path, dtype=torch.float32).to(here), saved_dir)
            with torch.no_grad():
                logits_single = single(input_ids=ids).logits
            result["reloaded_logits_rel"] = rel(logits_single.cpu(), logits_sharded)
        dist.barrier()
    except Exception:
        result["error"] = traceback.format_exc()
        raise
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(result, handle, indent=1)
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/ddp_worker.py: no destructor after the process group is gone


if __name__ == "__main__":
    main(*sys.argv[1:4])
