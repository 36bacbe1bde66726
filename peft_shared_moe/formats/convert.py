"""Export, import, inspect and tensor-parallel sharding: each is one walk over an `AdapterPlan`.

Writers stream: a layer's tensors are read (one open file per layer, see `SafetensorsReader`),
sliced for each TP rank and laid out for the target format, and written straight into
safetensors files whose headers were written first. Nothing is written at the destination
unless everything succeeds (`atomic_directory`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from ..config import SharedMoeLoraConfig
from .base import BaseSpec
from .io import (
    DTYPE_NAMES,
    SAFETENSORS_NAME,
    AdapterFormatError,
    PathLike,
    SafetensorsStreamWriter,
    TensorMeta,
    atomic_directory,
    check_destination,
    open_adapter,
    write_config,
)
from ..factors import PROJECTIONS, TP_SPLIT_DIM
from .layouts import LAYOUTS, PREFIX, Factor, layer_groups, layer_index
from .plan import AdapterPlan, check_finite, read_plan

FORMATS = ("native", "sglang", "tinker", "vllm")
EXPORT_FORMATS = ("sglang", "tinker", "vllm")
SHARD_INFO_NAME = "tp_shard.json"

# TP slicing (docs/MATH.md, as SGLang and vLLM load it): the dim of each factor a rank holds a
# slice of; every other factor is replicated. Experts: gate B and up B along I (matching the base
# weight's packed_colwise split), down A along I. Linears: column-parallel ones split B along the
# output, row-parallel ones split A along the input.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def _tp_dim(factor: Factor) -> Optional[int]:
    if factor.is_expert:
        return TP_SPLIT_DIM.get(factor.name)
    leaf = factor.module.rsplit(".", 1)[-1]
    if leaf in COLUMN_PARALLEL:
        return 0 if factor.name == "lora_B" else None
    if leaf in ROW_PARALLEL:
        return 1 if factor.name == "lora_A" else None
    raise AdapterFormatError(
        f"{factor.key}: no tensor-parallel rule for {leaf!r} (column-parallel: {', '.join(COLUMN_PARALLEL)}; "
        f"row-parallel: {', '.join(ROW_PARALLEL)})"
    )


def _tp_cut(factor: Factor, shape: tuple[int, ...], rank: int, tp_size: int) -> Optional[tuple[int, int, int]]:
    """(dim, start, length) of rank `rank`'s slice, or None for a replicated (or unsharded) factor."""
    dim = _tp_dim(factor) if tp_size > 1 else None
    if dim is None:
        return None
    if shape[dim] % tp_size:
        raise AdapterFormatError(
            f"{factor.key}: dim {dim} has size {shape[dim]}, which {tp_size} tensor-parallel ranks cannot split evenly"
        )
    length = shape[dim] // tp_size
    return dim, rank * length, length


def _layout_entries(factor: Factor, fmt: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], Optional[int]]]:
    """(output key, shape, expert index or None for the whole tensor) for one canonical factor."""
    if fmt != "vllm" or not factor.is_expert:
        return [(factor.key, shape, None)]
    proj, ab = factor.name.split(".")
    stem = f"{PREFIX}{factor.module}"
    return [(f"{stem}.{e}.{PROJECTIONS[proj]}.{ab}.weight", shape[1:], e) for e in range(factor.num_experts)]


def _entries(plan: AdapterPlan, factor: Factor, fmt: str, rank: int, tp_size: int):
    """The output tensors of `factor` on `rank`: the one place specs and data are both derived from."""
    meta = plan.output_meta(factor)
    cut = _tp_cut(factor, meta.shape, rank, tp_size)
    shape = meta.shape if cut is None else tuple(cut[2] if d == cut[0] else s for d, s in enumerate(meta.shape))
    return cut, _layout_entries(factor, fmt, shape)


def _output_config(plan: AdapterPlan, fmt: str):
    s = plan.settings
    common = dict(
        r=s.r,
        lora_alpha=s.lora_alpha,
        use_rslora=s.use_rslora,
        lora_dropout=s.lora_dropout,
        base_model_name_or_path=s.base_model_name_or_path,
        inference_mode=True,
    )
    if fmt == "native":
        if s.rank_pattern or s.alpha_pattern:
            raise AdapterFormatError(
                f"{plan.files.path}: rank_pattern/alpha_pattern {s.rank_pattern or s.alpha_pattern} cannot be kept: the "
                f"native format has one rank and one alpha per adapter"
            )
        return SharedMoeLoraConfig(**common, target_modules=plan.targets, shared_outer=plan.shared_outer, task_type=s.task_type)
    linear = [t for t in plan.targets if t != "experts"]
    experts = list(PROJECTIONS.values()) if plan.has_experts else []
    return LoraConfig(
        **common,
        target_modules=list(dict.fromkeys(experts + linear)),
        rank_pattern=s.rank_pattern,
        alpha_pattern=s.alpha_pattern,
        task_type=s.task_type or "CAUSAL_LM",
        bias="none",
    )


def _output_specs(plan: AdapterPlan, fmt: str, tp_size: int) -> list[list[tuple[str, TensorMeta]]]:
    """Per rank, every output tensor's key, shape and dtype; raises on a TP split that does not divide."""
    return [
        [(key, TensorMeta(shape, f.meta.dtype)) for f in plan.factors for key, shape, _ in _entries(plan, f, fmt, rank, tp_size)[1]]
        for rank in range(tp_size)
    ]


def _stream(plan: AdapterPlan, fmt: str, out_dirs: list[Path], specs, progress: Optional[bool], desc: str) -> None:
    """Read each factor once and write its pieces to every rank's file, in the order of `specs`."""
    tp_size = len(out_dirs)
    with ExitStack() as stack, tqdm(total=len(plan.factors), desc=desc, unit="tensor", disable=_disable(progress)) as bar:
        writers = [stack.enter_context(SafetensorsStreamWriter(d / SAFETENSORS_NAME, s)) for d, s in zip(out_dirs, specs)]
        for group in layer_groups(plan.factors):
            with plan.files.reader.session():
                for factor in group:
                    tensor = plan.load(factor)
                    for rank, writer in enumerate(writers):
                        cut, entries = _entries(plan, factor, fmt, rank, tp_size)
                        part = tensor if cut is None else tensor.narrow(*cut)
                        for key, _, expert in entries:
                            writer.write(key, part if expert is None else part[expert if part.shape[0] > 1 else 0])
                    bar.update()


@contextmanager
def _one_thread():
    """Run torch ops single-threaded for the duration of a conversion.

    The work is bound by disk and memory bandwidth, so intra-op threads add nothing but a barrier
    per op; on a machine whose cores are busy each barrier can wait a scheduler slice (measured on
    a loaded 2-core VM: `isfinite` on 65k floats 31 ms with 2 threads, 0.1 ms with 1). The previous
    setting is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _disable(progress: Optional[bool]) -> Optional[bool]:
    return None if progress is None else not progress  # None: tqdm shows bars on a terminal only


def _check_values(plan: AdapterPlan, progress: Optional[bool]) -> None:
    """Read every tensor once, one layer's at a time, and refuse NaN/Inf: values are checked before
    anything is written (the writers read the adapter a second time)."""
    reader = plan.files.reader
    with tqdm(total=len(plan.factors), desc="check", unit="tensor", disable=_disable(progress)) as bar:
        for group in layer_groups(plan.factors):
            with reader.session():
                for factor in group:
                    check_finite(factor.source.load(reader), factor.source)
                    bar.update()


def write_inputs(src: PathLike, base: Optional[BaseSpec] = None) -> list[PathLike]:
    """What a write reads, and so must never write into, over or inside: the adapter and a base given by path."""
    return [src] if base is None or isinstance(base, PretrainedConfig) else [src, base]


@dataclass
class PreparedWrite:
    """An adapter read and validated (every value included) and laid out for a format: only writing is left."""

    plan: AdapterPlan
    fmt: str
    tp_size: Optional[int]  # None: one adapter; N: rank0 ... rank{N-1}
    config: Any
    specs: list[list[tuple[str, TensorMeta]]]


def prepare_write(
    src: PathLike,
    fmt: str,
    *,
    tp_size: Optional[int] = None,
    shared_outer: Optional[bool] = None,
    base: Optional[BaseSpec] = None,
    allow_pickle: bool = False,
    progress: Optional[bool] = None,
) -> PreparedWrite:
    """Everything a write does short of writing, so that bad input is refused before the first byte."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if shared_outer not in (None, True, False):
        raise ValueError(f"shared_outer must be None (detect), True or False, got {shared_outer!r}")
    with _one_thread():
        plan = read_plan(open_adapter(src, allow_pickle), base=base, shared_outer=shared_outer)
        if fmt in ("sglang", "tinker") and plan.has_experts and not plan.shared_outer:
            warnings.warn(
                f"{src}: a per-expert adapter in the 3D layout has outer factors [E, ...]; SGLang recognises 3D "
                f"expert tensors as shared-outer (dim 0 == 1). For SGLang's or vLLM's per-expert loaders export "
                f"format='vllm'.",
                stacklevel=4,
            )
        config = _output_config(plan, fmt)
        specs = _output_specs(plan, fmt, tp_size or 1)  # every TP split is checked before anything is written
        _check_values(plan, progress)
    return PreparedWrite(plan, fmt, tp_size, config, specs)


def write_prepared(job: PreparedWrite, directory: Path, progress: Optional[bool] = None) -> None:
    """Write `job` into `directory`, an empty directory that the caller makes appear atomically."""
    tp_size = job.tp_size
    out_dirs = [directory] if tp_size is None else [directory / f"rank{rank}" for rank in range(tp_size)]
    for rank, out in enumerate(out_dirs):
        out.mkdir(exist_ok=True)
        write_config(out, job.config)
        if tp_size is not None:
            write_config(out, {"tp_rank": rank, "tp_size": tp_size, "format": job.fmt}, SHARD_INFO_NAME)
    with _one_thread():
        _stream(job.plan, job.fmt, out_dirs, job.specs, progress, desc=f"{job.fmt} tp={tp_size}" if tp_size else job.fmt)


def _write(
    src: PathLike,
    dst: PathLike,
    fmt: str,
    *,
    tp_size: Optional[int],
    shared_outer: Optional[bool],
    base: Optional[BaseSpec],
    overwrite: bool,
    allow_pickle: bool,
    progress: Optional[bool],
) -> Path:
    """The one writer behind convert/export/import (tp_size None: one adapter) and shard (dst/rank{i})."""
    inputs = write_inputs(src, base)
    check_destination(dst, overwrite, inputs)  # fail before reading anything
    job = prepare_write(src, fmt, tp_size=tp_size, shared_outer=shared_outer, base=base, allow_pickle=allow_pickle,
                        progress=progress)
    with atomic_directory(dst, overwrite, inputs) as tmp:
        write_prepared(job, tmp, progress)
    return Path(dst)


def convert_adapter(
    src: PathLike,
    dst: PathLike,
    format: str,
    *,
    shared_outer: Optional[bool] = None,
    base: Optional[BaseSpec] = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Optional[bool] = None,
) -> Path:
    """Convert any accepted adapter layout into `format` ("native", "sglang", "tinker" or "vllm").

    `shared_outer`: None detects (see `import_adapter`), True / False force. `base` (a config.json,
    a model directory or a `PretrainedConfig`) adds checks of every module and shape against the
    base model. Raises `ValueError` (`AdapterFormatError`) naming the offending keys, and writes
    nothing, on bad input; `FileExistsError` if `dst` exists and `overwrite` is False.
    """
    return _write(src, dst, format, tp_size=None, shared_outer=shared_outer, base=base, overwrite=overwrite,
                  allow_pickle=allow_pickle, progress=progress)


def export_adapter(src: PathLike, dst: PathLike, format: str = "sglang", **kwargs) -> Path:
    """Write an adapter for a serving engine: "sglang" / "tinker" (the same 3D layout under a plain
    PEFT LoRA config) or "vllm" (per-expert 2D keys, each shared factor copied to every expert).
    Keyword arguments as for `convert_adapter`."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {format!r} (use import_adapter for native)")
    return convert_adapter(src, dst, format, **kwargs)


def import_adapter(src: PathLike, dst: PathLike, shared_outer: Optional[bool] = None, **kwargs) -> Path:
    """Turn any accepted layout (3D with w1/w2/w3 or gate/up/down names, fused gate_up_proj, per-expert
    2D keys; float32/bf16/fp16; attention LoRA beside) into a native adapter that
    `PeftModel.from_pretrained` loads.

    `shared_outer=None` detects: shapes with dim 0 == 1 are shared; per-expert copies identical
    (exactly) across all experts of every layer are stored shared; otherwise per-expert.
    True requires identical copies (an error names the first that differs); False stores every
    factor per expert. Keyword arguments as for `convert_adapter`.
    """
    return convert_adapter(src, dst, "native", shared_outer=shared_outer, **kwargs)


def shard_adapter(
    src: PathLike,
    dst: PathLike,
    tp_size: int,
    *,
    format: str = "native",
    shared_outer: Optional[bool] = None,
    base: Optional[BaseSpec] = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Optional[bool] = None,
) -> Path:
    """Split an adapter for `tp_size` tensor-parallel ranks into `dst/rank{i}/` (config, tensors and
    `tp_shard.json`), by the SGLang/vLLM rule: expert gate B and up B split along I, down A along I,
    gate A / up A / down B replicated; q/k/v (and dense gate/up) B split along the output, o_proj
    (and dense down) A along the input, their other factor replicated. The sum over ranks of the
    partial outputs (row-parallel) or their concatenation (column-parallel) is the unsharded output.
    """
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
    return _write(src, dst, format, tp_size=tp_size, shared_outer=shared_outer, base=base, overwrite=overwrite,
                  allow_pickle=allow_pickle, progress=progress)


@dataclass
class AdapterInfo:
    """What `inspect_adapter` found; `str()` is a human summary, `to_dict()` is JSON-ready."""

    path: str
    format: str  # native, sglang (= tinker), vllm, or the layout name for other layouts
    layout: str
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    scaling: float
    shared_outer: Optional[bool]  # None: no experts
    num_experts: Optional[int]
    hidden_size: Optional[int]
    intermediate_size: Optional[int]
    layers: list[int]
    moe_layers: list[int]
    targets: list[str]
    num_tensors: int
    tensor_bytes: int
    file_bytes: int
    dtypes: dict[str, int]
    values_checked: bool
    base_model_name_or_path: Optional[str] = None
    rank_pattern: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        sharing = {True: "shared-outer (gate A, up A, down B shared)", False: "per-expert", None: "-"}[self.shared_outer]
        experts = (
            f"E={self.num_experts} H={self.hidden_size} I={self.intermediate_size}, {sharing}" if self.num_experts else "none"
        )
        lines = [
            ("path", self.path),
            ("format", f"{self.format} (layout {self.layout}: {LAYOUTS[self.layout]})"),
            ("peft_type", self.peft_type),
            ("rank", f"r={self.r} lora_alpha={self.lora_alpha} use_rslora={self.use_rslora} scaling={self.scaling:g}"
                     + (f" rank_pattern={self.rank_pattern}" if self.rank_pattern else "")),
            ("experts", experts),
            ("layers", f"{len(self.layers)} with LoRA, {len(self.moe_layers)} with experts LoRA"),
            ("targets", ", ".join(self.targets)),
            ("tensors", f"{self.num_tensors}, {_human_bytes(self.tensor_bytes)} ({', '.join(f'{k}: {v}' for k, v in self.dtypes.items())})"),
            ("values", "all finite" if self.values_checked else "not read (header only)"),
        ]
        return "\n".join(f"{name + ':':11s}{value}" for name, value in lines)


def _human_bytes(size: int) -> str:
    return next(f"{size / scale:.2f} {unit}" for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")) if size >= scale or unit == "B")


def _format_name(peft_type: str, layout: str) -> str:
    if peft_type != "LORA":
        return "native"
    return {"3d": "sglang", "per-expert": "vllm"}.get(layout, layout)


def inspect_adapter(
    path: PathLike,
    *,
    base: Optional[BaseSpec] = None,
    read_values: bool = True,
    allow_pickle: bool = False,
    progress: Optional[bool] = None,
) -> AdapterInfo:
    """Recognise and validate an adapter, and summarise it.

    With `read_values` (the default) every tensor is read once, one at a time, to check it is
    finite and to detect per-expert copies that are really shared (what `import_adapter` would
    store); without it only the header is read.
    """
    files = open_adapter(path, allow_pickle)
    with _one_thread():
        plan = read_plan(files, base=base, read=read_values)
        if read_values:
            _check_values(plan, progress)
    meta = files.reader.meta
    dims = plan.dims
    return AdapterInfo(
        path=str(files.path),
        format=_format_name(plan.settings.peft_type, plan.layout),
        layout=plan.layout,
        peft_type=plan.settings.peft_type,
        r=plan.settings.r,
        lora_alpha=plan.settings.lora_alpha,
        use_rslora=plan.settings.use_rslora,
        scaling=plan.settings.scaling,
        shared_outer=plan.shared_outer if dims else None,
        num_experts=dims.num_experts if dims else None,
        hidden_size=dims.hidden if dims else None,
        intermediate_size=dims.inter if dims else None,
        layers=sorted({i for i in map(layer_index, plan.modules) if i is not None}),
        moe_layers=sorted({i for f in plan.factors if f.is_expert and (i := layer_index(f.module)) is not None}),
        targets=plan.targets,
        num_tensors=len(meta),
        tensor_bytes=sum(m.nbytes for m in meta.values()),
        file_bytes=files.file_bytes,
        dtypes=dict(Counter(DTYPE_NAMES[m.dtype] for m in meta.values())),
        values_checked=read_values,
        base_model_name_or_path=plan.settings.base_model_name_or_path,
        rank_pattern=plan.settings.rank_pattern or None,
    )
