"""The plan every conversion walks: an adapter's canonical factors, validated, with sharing decided.

Validation (keys, shapes, ranks, the base model) runs on the header before any data is read; the
only data read while planning is what deciding shared-outer needs (and it is checked finite).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..factors import EXPERT_FACTORS, factor_shape
from .base import BaseSpec, ExpertDims, LinearDims, base_experts_layouts, base_modules
from .io import AdapterFiles, AdapterFormatError, Reader, TensorMeta
from .layouts import (
    PREFIX,
    Factor,
    LoraSettings,
    Source,
    layer_groups,
    native_targets,
    raise_problems,
    read_factors,
    read_settings,
)


@dataclass
class AdapterPlan:
    """An adapter read and validated, in canonical form; `shared_outer` is decided."""

    files: AdapterFiles
    settings: LoraSettings
    layout: str
    factors: list[Factor]
    shared_outer: bool
    dims: Optional[ExpertDims]  # of the experts blocks; None for an adapter without experts

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(f.module for f in self.factors))

    @property
    def has_experts(self) -> bool:
        return self.dims is not None

    @property
    def targets(self) -> list[str]:
        return native_targets(self.factors)

    def output_meta(self, factor: Factor) -> TensorMeta:
        if not factor.is_outer:
            return factor.meta
        outer = 1 if self.shared_outer else factor.num_experts
        return TensorMeta((outer, *factor.meta.shape[1:]), factor.meta.dtype)

    def load(self, factor: Factor) -> torch.Tensor:
        """The factor's tensor as it is written: shared-outer factors [1, ...], per-expert ones [E, ...]."""
        reader = self.files.reader
        if factor.is_outer and self.shared_outer:
            tensor = factor.source.load(reader, expert=0)  # the copies were checked identical when planning
        else:
            tensor = factor.source.load(reader)
            if factor.is_outer and tensor.shape[0] != factor.num_experts:
                tensor = tensor.expand(factor.num_experts, *tensor.shape[1:]).contiguous()
        check_finite(tensor, factor.source)
        return tensor


def check_finite(tensor: torch.Tensor, source: Source) -> None:
    """Refuse NaN/Inf, naming the tensor (for stacked per-expert keys, the first expert's key that has one)."""
    bad = ~torch.isfinite(tensor)
    if bad.any():
        where = source.describe(int(bad.flatten(1).any(1).nonzero()[0, 0])) if source.stacked else source.label
        raise AdapterFormatError(f"{where}: {int(bad.sum())} NaN/Inf value(s)")


def _format_shape(shape: tuple) -> str:
    return "[" + ", ".join("*" if size is None else str(size) for size in shape) + "]"


def _check_shapes(factors: list[Factor], settings: LoraSettings, base: Optional[dict], where: str) -> Optional[ExpertDims]:
    """Every factor against the base's dims (or, without a base, the first experts block's), and its rank."""
    problems: list[str] = []
    experts = [f for f in factors if f.is_expert]
    inferred = None
    if experts and base is None:
        gate = {f.name: f for f in experts if f.module == experts[0].module}
        b_shape, a_shape = gate["w1.lora_B"].meta.shape, gate["w1.lora_A"].meta.shape
        if len(b_shape) != 3 or len(a_shape) != 3:
            raise AdapterFormatError(
                f"{where}: expected 3D gate factors, found {gate['w1.lora_A'].source.label} {list(a_shape)} and "
                f"{gate['w1.lora_B'].source.label} {list(b_shape)}"
            )
        inferred = ExpertDims(b_shape[0], a_shape[2], b_shape[1])
    for f in factors:
        r = settings.rank_for(f.module)
        dims = base[f.module] if base is not None else inferred if f.is_expert else None
        if f.is_expert:
            allowed = {factor_shape(f.name, dims.num_experts, dims.hidden, dims.inter, r, shared) for shared in (True, False)}
            context = f"E={dims.num_experts}, H={dims.hidden}, I={dims.inter}, r={r}"
        elif dims is not None:
            allowed = {(r, dims.in_features)} if f.name == "lora_A" else {(dims.out_features, r)}
            context = f"r={r}, in={dims.in_features}, out={dims.out_features}"
        else:
            allowed = {(r, None)} if f.name == "lora_A" else {(None, r)}
            context = f"r={r}"
        shape = f.meta.shape
        if not any(len(shape) == len(want) and all(w in (None, s) for s, w in zip(shape, want)) for want in allowed):
            stacked = " (per-expert keys stacked on dim 0)" if f.source.stacked else ""
            expected = " or ".join(_format_shape(s) for s in sorted(allowed))
            problems.append(f"{f.source.label}: expected shape {expected}, found {list(shape)}{stacked} ({context})")
    raise_problems(f"{where}: tensor shapes do not fit" + (" the base model" if base is not None else ""), problems)
    return base[experts[0].module] if experts and base is not None else inferred


def _check_modules(factors: list[Factor], base: dict, where: str) -> None:
    kinds = {f.module: f.is_expert for f in factors}
    problems = []
    for module, is_expert in kinds.items():
        if module not in base:
            problems.append(f"{PREFIX}{module}.*: the base model has no such module to adapt")
        elif isinstance(base[module], ExpertDims) != is_expert:
            problems.append(f"{PREFIX}{module}.*: an {'experts' if is_expert else 'linear'} adapter on a different module type")
    for module, dims in base.items():
        if module not in kinds:
            names = EXPERT_FACTORS if isinstance(dims, ExpertDims) else ("lora_A", "lora_B")
            problems.extend(f"{PREFIX}{module}.{name}.weight: missing" for name in names)
    raise_problems(f"{where}: the adapter's modules do not match the base model", problems)


def _first_difference(reader: Reader, factor: Factor) -> Optional[int]:
    """The first expert whose copy of an outer factor differs (exactly) from expert 0's, or None.

    One vectorised comparison over the stacked copies: per-expert element-wise ops would cost a
    thread-pool round trip each, which dominates on small CPUs.
    """
    copies = factor.source.load(reader)  # (E, ...)
    check_finite(copies, factor.source)
    same = (copies == copies[:1]).flatten(1).all(dim=1)  # (E,)
    return None if bool(same.all()) else int((~same).nonzero()[0, 0])


def _decide_sharing(factors: list[Factor], reader: Reader, shared_outer: Optional[bool], read: bool, where: str) -> bool:
    """Shared-outer or per-expert for the whole adapter (the native config has one flag).

    None: as the tensors declare it (dim 0 == 1 is shared), except that per-expert copies that are
    identical across all experts of every layer are stored shared; a mix of declarations is an
    error. True: every per-expert copy must be identical (expert 0's is never kept silently).
    False: shared factors are copied to every expert.
    """
    outer = [f for f in factors if f.is_outer]
    if not outer:  # no experts: the flag is moot
        return shared_outer is not False
    if shared_outer is False:
        return False
    declared = [f.meta.shape[0] == 1 for f in outer]
    if shared_outer is None and any(declared) and not all(declared):
        conflict = next(f for f, shared in zip(outer, declared) if shared != declared[0])
        kind = {True: "shared", False: "per-expert"}
        raise AdapterFormatError(
            f"{where}: mixed layouts in one adapter: {conflict.source.label} {list(conflict.meta.shape)} is "
            f"{kind[not declared[0]]}, but {outer[0].source.label} {list(outer[0].meta.shape)} is {kind[declared[0]]}; "
            f"pass shared_outer=True or False to convert it anyway"
        )
    if all(declared):
        return True
    if not read:
        return False
    for group in layer_groups([f for f, shared in zip(outer, declared) if not shared]):
        with reader.session():
            for factor in group:
                expert = _first_difference(reader, factor)
                if expert is None:
                    continue
                if shared_outer:
                    raise AdapterFormatError(
                        f"{where}: shared_outer=True, but {factor.source.describe(expert)} differs from expert 0's copy; "
                        f"a shared factor must be identical for every expert (expert 0's is never kept silently)"
                    )
                return False
    return True


def read_plan(
    files: AdapterFiles,
    *,
    base: Optional[BaseSpec] = None,
    shared_outer: Optional[bool] = None,
    read: bool = True,
) -> AdapterPlan:
    """Recognise, validate and plan `files`; raises `AdapterFormatError` listing every problem found.

    `read=False` plans from the header alone: sharing is then what the shapes declare.
    """
    where = str(files.path)
    settings = read_settings(files.config, f"{where}/adapter_config.json")
    experts_of = None
    if base is not None:  # built only if the layout needs it (one more meta-device model)
        layouts = functools.cache(lambda: base_experts_layouts(base))
        experts_of = lambda module: layouts().get(module)  # noqa: E731
    layout, factors = read_factors(files.reader.meta, where, experts_of)
    if layout == "peft-params" and (settings.rank_pattern or settings.alpha_pattern):
        raise AdapterFormatError(
            f"{where}/adapter_config.json: rank_pattern / alpha_pattern with PEFT target_parameters are keyed on "
            f"parameter names (gate_up_proj, down_proj) that the converted modules do not have; not converted"
        )
    expected: Optional[dict[str, Union[ExpertDims, LinearDims]]] = None
    if base is not None:
        expected = base_modules(base, native_targets(factors))
        _check_modules(factors, expected, where)
    dims = _check_shapes(factors, settings, expected, where)
    shared = _decide_sharing(factors, files.reader, shared_outer, read, where)
    return AdapterPlan(files, settings, layout, factors, shared, dims)
