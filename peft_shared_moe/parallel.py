"""Tensor and expert parallelism: the adapter follows the sharding transformers gave the base model.

A model loaded with `tp_plan="auto"`, `DistributedConfig(tp_size=N)` or expert parallelism holds
its base weights as DTensors and runs each sharded module through a hook of its own (inputs made
local, partial outputs all-reduced). Our factors become DTensors on the same mesh, split where the
base is split (docs/PARALLEL.md derives each rule), and every forward computes on the local shards:

- experts, tensor parallel (gate_up_proj packed-colwise, down_proj rowwise, both along I):
  gate/up `lora_B` and down `lora_A` are split along I; the factors touching H (shared or not)
  are replicated. The engine's own output all-reduce sums the LoRA partials with the base's.
- experts, expert parallel (experts split on dim 0): per-expert factors are split on dim 0 with
  their experts; shared factors are replicated.
- dense linears: colwise (weight split on out) -> `lora_B` split on out, `lora_A` replicated;
  rowwise (weight split on in) -> `lora_A` split on in, `lora_B` replicated.

A replicated factor gets a partial gradient on every rank (each rank sees only its shard of the
product it feeds); `SumGradOver` sums it in the backward, once per use, so every replica receives the
same, full gradient and stays identical. Data parallelism that shards the model before the adapter
exists (transformers' `fsdp_size`, alone or as the data dim of an (fsdp, tp) or (efsdp, ep) mesh)
never manages the factors: they start alike and their gradients are averaged over the data ranks.
Anything else (other meshes or placements, a size that does not divide) is refused, naming it.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
from torch import nn

try:  # torch.distributed is optional (some builds have none); nothing here runs without it
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment]


class ParallelLayoutError(ValueError):
    """The base is sharded in a way this adapter cannot follow exactly; the message names what and why."""


def is_dtensor(t: object) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def is_replicated(t: object) -> bool:
    """A DTensor every rank holds whole (a replicated factor, whose gradient each rank sees only part of)."""
    return is_dtensor(t) and all(isinstance(p, Replicate) for p in t.placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage and autograd), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


class SumGradOver(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over `group` (each rank holds a partial one)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)  # never reduce into autograd's own buffer
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SumOver(torch.autograd.Function):
    """Sums a partial value over `group` in the forward; the gradient of the sum is passed through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)  # one copy, which the all-reduce overwrites
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


@dataclass(frozen=True)
class Sharding:
    """How one adapted module's factors are placed on the base's 1D mesh.

    `split_dim` maps a factor name to the dim it is split along; factors not named are replicated.
    `expert_parallel`: the experts are split on dim 0, so routes to another rank's experts arrive as
    index `num_local_experts` (weight 0) and are skipped.
    """

    mesh: object
    split_dim: dict
    style: str  # "tp", "ep" (experts), "colwise", "rowwise", "replicated" (linears)
    # A 2D mesh's data-parallel dim ((fsdp, tp): fsdp; (efsdp, ep): efsdp), over which the factors
    # (which FSDP does not manage, being added after it) are kept identical; their gradients are summed
    # over it and divided by `data_divisor`, the number of batches they cover (docs/PARALLEL.md).
    data_mesh: object = None
    data_divisor: int = 1

    @property
    def group(self):
        return self.mesh.get_group()

    @property
    def expert_parallel(self) -> bool:
        return self.style == "ep"

    def split_dim_of(self, factor: str, shape: tuple) -> Optional[int]:
        """The dim `factor` is split along, or None (replicated). A shared factor (dim 0 == 1) is never split."""
        dim = self.split_dim.get(factor)
        if self.expert_parallel and shape[0] == 1:
            return None
        return dim

    def distribute(self, factor: str, full: torch.Tensor) -> "DTensor":
        """A full factor -> this rank's DTensor shard; rank 0's values, so every replica starts identical."""
        dim = self.split_dim_of(factor, tuple(full.shape))
        if dim is not None and full.shape[dim] % self.mesh.size():
            raise ParallelLayoutError(
                f"factor {factor} of shape {list(full.shape)}: dim {dim} ({full.shape[dim]}) does not divide over "
                f"{self.mesh.size()} ranks"
            )
        placements = [Replicate() if dim is None else Shard(dim)]
        return distribute_tensor(full.contiguous(), self.mesh, placements, src_data_rank=0)

    @property
    def splits_compute(self) -> bool:
        """The module's work is split over the ranks (its factors' gradients are partial on each), as
        opposed to a module the plan leaves whole, which every rank runs in full on the same batch."""
        return self.style != "replicated"

    def local_for_compute(self, param: torch.Tensor) -> torch.Tensor:
        """The local shard a forward computes with; a replicated factor of a split module gets a partial
        gradient on each rank, which is summed over them."""
        shard = local(param)
        if self.splits_compute and is_replicated(param) and torch.is_grad_enabled() and param.requires_grad:
            shard = SumGradOver.apply(shard, self.group)
        return shard


# Mesh dims that shard data, not the model: FSDP's shards are whole again inside the forward.
DATA_PARALLEL_DIMS = ("fsdp", "dp_shard", "dp_replicate", "dp", "efsdp")


def is_data_parallel_shard(param: torch.Tensor) -> bool:
    """A DTensor placed by FSDP (transformers' `DistributedConfig(fsdp_size=N)` names its mesh "fsdp")."""
    names = param.device_mesh.mesh_dim_names if is_dtensor(param) else None
    return bool(names) and all(n in DATA_PARALLEL_DIMS for n in names)


def _model_parallel_part(param: torch.Tensor, where: str):
    """(mesh, placement, data mesh) of the model-parallel part of a DTensor's placement: its 1D mesh,
    or the "tp" dim of transformers' 2D (fsdp, tp) mesh, whose "fsdp" dim is data parallel."""
    mesh = param.device_mesh
    if mesh.ndim == 1:
        return mesh, param.placements[0], None
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim == 2 and names in (("fsdp", "tp"), ("efsdp", "ep")):
        return mesh[names[1]], param.placements[1], mesh[names[0]]
    raise ParallelLayoutError(
        f"{where} is sharded over a {mesh.ndim}D device mesh {tuple(mesh.mesh.shape)} {names or ''} with placements "
        f"{param.placements}; the adapter follows 1D tensor- or expert-parallel meshes, (fsdp, tp) and (efsdp, ep)"
    )


def _placement_name(p) -> str:
    return type(p).__name__


def model_parallel_mesh(model: nn.Module):
    """(mesh, data mesh) of the first parameter split for tensor / expert parallelism, or None."""
    for name, param in model.named_parameters():
        if is_dtensor(param) and not is_data_parallel_shard(param):
            mesh, _, data_mesh = _model_parallel_part(param, name)
            return mesh, data_mesh
    return None


def data_parallel_mesh(model: nn.Module):
    """The FSDP mesh of a model transformers already sharded for data parallelism, or None."""
    for param in model.parameters():
        if is_data_parallel_shard(param):
            return param.device_mesh
    return None


def average_grads_over(params: list[torch.Tensor], mesh, divisor: Optional[int] = None) -> None:
    """Data parallelism for factors added after FSDP wrapped the model (which then leaves them out):
    each rank's gradient, of its own batch, is replaced by the sum over `mesh` divided by `divisor`
    (default: the mean over the ranks, as FSDP does for the parameters it manages), so every replica
    takes the same step."""
    group, size = mesh.get_group(), divisor or mesh.size()

    def average(param: torch.Tensor) -> None:
        grad = local(param.grad)
        dist.all_reduce(grad, group=group)
        grad.div_(size)

    for p in params:
        p.register_post_accumulate_grad_hook(average)
        p._shared_moe_grad_hook = average  # carried over by `recast_parameter`


def recast_parameter(param: nn.Parameter, dtype: torch.dtype) -> nn.Parameter:
    """`param` in `dtype` as a new parameter (shards and all: `param.data = ...` would change only a
    DTensor's declared dtype), keeping the gradient averaging `average_grads_over` gave it."""
    new = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
    hook = getattr(param, "_shared_moe_grad_hook", None)
    if hook is not None:
        new.register_post_accumulate_grad_hook(hook)
        new._shared_moe_grad_hook = hook
    return new


def broadcast_replicas(params: list[torch.Tensor], mesh) -> None:
    """Plain (unsharded) factors of a parallel model: every rank takes rank 0's values, so replicas that
    train on the same batch stay identical."""
    group = mesh.get_group()
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for p in params:
            dist.broadcast(local(p.data), src=src, group=group)


def experts_sharding(experts: nn.Module, transposed: bool, concatenated: bool) -> Optional[Sharding]:
    """The factors' sharding for a (possibly) sharded fused experts block; None when it is not sharded."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if not (is_dtensor(gate_up) or is_dtensor(down)) or is_data_parallel_shard(gate_up):
        return None
    name = type(experts).__name__
    if not (is_dtensor(gate_up) and is_dtensor(down)):
        raise ParallelLayoutError(f"{name}: gate_up_proj and down_proj must both be sharded, or neither")
    mesh, gu, data_mesh = _model_parallel_part(gate_up, f"{name}.gate_up_proj")
    _, dn, _ = _model_parallel_part(down, f"{name}.down_proj")
    _check_even(gate_up, gu, mesh.size(), f"{name}.gate_up_proj")
    _check_even(down, dn, mesh.size(), f"{name}.down_proj")
    if _is_shard(gu, 0) and _is_shard(dn, 0):  # whole experts per rank
        # Under FSDP an EP group's experts see the tokens of several batches; like transformers does for
        # the experts themselves, the gradient summed over the group is divided by the number of batches.
        divisor = _data_parallel_size(experts) if data_mesh is not None else 1
        return Sharding(mesh, {"w1.lora_B": 0, "w3.lora_B": 0, "w2.lora_A": 0, "w1.lora_A": 0, "w3.lora_A": 0,
                               "w2.lora_B": 0}, "ep", data_mesh, divisor)
    inter_dim_gate_up = 2 if transposed else 1  # the 2I dim of gate_up_proj
    inter_dim_down = 1 if transposed else 2  # the I dim of down_proj
    packed = type(gu).__name__ == "_StridedShard" and gu.dim == inter_dim_gate_up and getattr(gu, "split_factor", 0) == 2
    if concatenated and packed and _is_shard(dn, inter_dim_down, strided_ok=False):
        return Sharding(mesh, {"w1.lora_B": 1, "w3.lora_B": 1, "w2.lora_A": 2}, "tp", data_mesh, _size(data_mesh))
    raise ParallelLayoutError(
        f"{name}: gate_up_proj placed {_placement_name(gu)}{getattr(gu, 'dim', '')} and down_proj "
        f"{_placement_name(dn)}{getattr(dn, 'dim', '')}; the adapter follows packed-colwise gate_up / rowwise down "
        f"(tensor parallel, [gate; up] layout) or experts split on dim 0 (expert parallel)"
    )


def _size(mesh) -> int:
    return 1 if mesh is None else mesh.size()


def _data_parallel_size(experts: nn.Module) -> int:
    """How many different batches the model trains on at once (transformers' `DistributedConfig.dp_size`)."""
    distributed = getattr(getattr(experts, "config", None), "distributed_config", None)
    size = getattr(distributed, "dp_size", None)
    if not isinstance(size, int) or size < 1:
        raise ParallelLayoutError(
            f"{type(experts).__name__} is expert parallel over an FSDP mesh, but its config has no "
            f"distributed_config.dp_size to scale the adapter's gradients by"
        )
    return size


def _check_even(param: torch.Tensor, placement, size: int, where: str) -> None:
    """Every rank must hold an equal slice: the factors are split into equal slices along the same dim."""
    if getattr(placement, "dim", None) is None:  # Shard and _StridedShard have a dim (not always related types)
        return
    parts = size * getattr(placement, "split_factor", 1)  # a packed gate/up splits each half
    length = param.shape[placement.dim]
    if length % parts:
        raise ParallelLayoutError(
            f"{where} {list(param.shape)} is split unevenly along dim {placement.dim}: {length} does not divide by "
            f"{size} ranks{' in each of its packed halves' if parts != size else ''}; the adapter's factors split "
            f"into equal slices only (for a packed gate/up, the expert intermediate size must divide by {size})"
        )


def _is_shard(p, dim: int, strided_ok: bool = False) -> bool:
    if not isinstance(p, Shard):
        return False
    if type(p).__name__ == "_StridedShard" and not strided_ok:
        return False
    return p.dim == dim


def linear_sharding(linear: nn.Linear) -> Optional[Sharding]:
    """Colwise (weight split on out) or rowwise (split on in) for a sharded linear; None when not sharded."""
    weight = linear.weight
    if not is_dtensor(weight) or is_data_parallel_shard(weight):
        return None
    mesh, p, data_mesh = _model_parallel_part(weight, "linear weight")
    _check_even(weight, p, mesh.size(), "linear weight")
    if _is_shard(p, 0):
        return Sharding(mesh, {"lora_B": 0}, "colwise", data_mesh, _size(data_mesh))
    if _is_shard(p, 1):
        return Sharding(mesh, {"lora_A": 1}, "rowwise", data_mesh, _size(data_mesh))
    if isinstance(p, Replicate):
        return None
    raise ParallelLayoutError(f"linear weight placed {p}; the adapter follows colwise (Shard(0)) or rowwise (Shard(1))")


# ---- saving a sharded adapter -------------------------------------------------------------------------

SAVE_TIMEOUT_ENV = "PEFT_SHARED_MOE_SAVE_TIMEOUT"
DEFAULT_SAVE_TIMEOUT_S = 60.0
_save_calls = itertools.count()  # the n-th gathering save of this process meets the n-th of every other rank


class IncompleteSaveError(RuntimeError):
    """A sharded adapter was saved by some ranks only; the message names the missing ranks and the fix."""


def needs_gather(t: object) -> bool:
    """A DTensor whose whole value no single rank holds (FSDP2 or TP/EP shards): reading it is a collective."""
    return is_dtensor(t) and not is_replicated(t)


def gather_for_save(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors for a file, from plain tensors or DTensors (FSDP2 shards, tensor/expert-parallel shards).

    Gathering a shard is a collective, so every rank holding part of it must call `save_pretrained`
    (with `is_main_process` choosing the writer). A rank that saves alone (`if rank == 0:
    model.save_pretrained(...)`) would otherwise block in the first all-gather until the process
    group's timeout (30 minutes under the Trainer), or pair it with whatever collective the other
    ranks run next. Before any gather, each rank therefore checks in through the process group's
    key-value store, which is no collective, and waits at most `PEFT_SHARED_MOE_SAVE_TIMEOUT`
    seconds (default 60) for the others: past that, `IncompleteSaveError` names who is missing and
    nothing is written.
    """
    sharded = {k: v for k, v in tensors.items() if needs_gather(v)}
    if sharded:
        _wait_for_every_saving_rank(sharded)
    return {k: v.full_tensor() if is_dtensor(v) else v for k, v in tensors.items()}


def _save_timeout() -> float:
    raw = os.environ.get(SAVE_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_SAVE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{SAVE_TIMEOUT_ENV}={raw!r}: expected a finite number of seconds > 0")
    return value


def _wait_for_every_saving_rank(sharded: dict[str, torch.Tensor]) -> None:
    ranks = sorted({int(r) for t in sharded.values() for r in t.device_mesh.mesh.flatten().tolist()})
    if len(ranks) < 2:
        return
    timeout = _save_timeout()
    call = next(_save_calls)
    me = dist.get_rank()
    keys = {r: f"peft_shared_moe/save/{call}/rank{r}" for r in ranks}
    store = dist.distributed_c10d._get_default_store()
    store.set(keys[me], "1")
    try:
        store.wait(list(keys.values()), timedelta(seconds=timeout))
    except RuntimeError as error:  # the store's timeout (DistStoreError)
        missing = [r for r, key in keys.items() if not store.check([key])]
        if not missing:  # everyone checked in: the store failed for another reason
            raise
        key, t = next(iter(sharded.items()))
        raise IncompleteSaveError(
            f"save_pretrained on rank {me}: rank(s) {missing} of {ranks} did not call it within {timeout:g} s "
            f"({SAVE_TIMEOUT_ENV}). The adapter is sharded ({key}: {list(t.to_local().shape)} of "
            f"{list(t.shape)} on this rank, placements {list(t.placements)}) and a file holds whole tensors, "
            f"which takes every rank: call model.save_pretrained(path, is_main_process=rank == 0) on all ranks. "
            f"No adapter file was written. ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from None
