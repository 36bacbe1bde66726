"""Recognising adapter layouts: from the safetensors header alone, every accepted input becomes a
list of canonical `Factor`s.

A factor is one tensor of the native layout (`peft_shared_moe/factors.py`: `w1.lora_A` ... for an experts block,
`lora_A` / `lora_B` for a linear) with the place its data lives in the source: a 3D tensor, a row
range of a fused gate_up tensor, or one 2D tensor per expert. `plan.py` validates the factors and
decides sharing; writers stream them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from peft.utils.other import get_pattern_key

from ..config import LORA_INITS, PEFT_TYPE, SHARED_MOE_INITS, ConfigError, validate_lora_fields
from ..factors import EXPERT_FACTORS, OUTER_FACTORS, PROJECTIONS
from ..ops.experts_layout import ExpertsLayout
from .io import AdapterFormatError, Reader, TensorMeta

PREFIX = "base_model.model."
FUSED = "gate_up_proj"

LAYOUTS = {
    "3d": "experts.w1|w3|w2.lora_A|lora_B.weight, 3D (native, SGLang, Tinker)",
    "3d-proj": "experts.gate_proj|up_proj|down_proj.lora_A|lora_B.weight, 3D",
    "fused": "experts.gate_up_proj|down_proj.lora_A|lora_B.weight, 3D (gate and up concatenated)",
    "per-expert": "experts.{e}.gate_proj|up_proj|down_proj.lora_A|lora_B.weight, 2D (vLLM)",
    "per-expert-w": "experts.{e}.w1|w3|w2.lora_A|lora_B.weight, 2D",
    "peft-params": "experts[.base_layer].lora_A|lora_B.weight, 2D [r*E, in] / [out, r*E] (PEFT target_parameters "
                   "on gate_up_proj and down_proj; needs the base)",
    "dense": "no experts tensors (linear LoRA only)",
}
PER_EXPERT_LAYOUTS = ("per-expert", "per-expert-w")

_EXPERT_KEY = re.compile(
    r"^(?P<module>.+\.experts)\.(?:(?P<expert>\d+)\.)?"
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj|gate_up_proj)\.lora_(?P<ab>[AB])\.weight$"
)
_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# PEFT's LoRA on an experts block's parameters: one wrapper per targeted parameter, nested (base_layer.)
_PEFT_PARAM_KEY = re.compile(r"^(?P<module>.+\.experts)\.(?P<nest>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def natural_key(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_index(module: str) -> Optional[int]:
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


def _listing(items: list[str], limit: int = 20) -> str:
    shown = "\n    ".join(items[:limit])
    return f"\n    {shown}" + (f"\n    ... and {len(items) - limit} more" if len(items) > limit else "")


def raise_problems(what: str, problems: list[str]) -> None:
    if problems:
        raise AdapterFormatError(f"{what}:{_listing(problems)}")


# ---- config -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSettings:
    """The adapter_config.json fields that conversions keep or check."""

    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    lora_dropout: float = 0.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def rank_for(self, module: str) -> int:
        """`rank_pattern` matched as PEFT does, against the module path (e.g. model.layers.0.mlp.experts)."""
        return self.rank_pattern.get(get_pattern_key(list(self.rank_pattern), module), self.r)


def read_settings(config: dict[str, Any], where: str) -> LoraSettings:
    """Check the config is a LoRA we can convert exactly, and keep what conversions need.

    Types and values go through `validate_lora_fields`, the same gate as `SharedMoeLoraConfig`;
    a native config gets the native rules (what `PeftModel.from_pretrained` would apply to it).
    """
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", PEFT_TYPE):
        raise AdapterFormatError(f"{where}: peft_type {peft_type!r} is not supported (expected 'LORA' or {PEFT_TYPE.value!r})")
    if config.get("target_parameters") and config.get("target_modules") == []:
        config = {**config, "target_modules": None}  # PEFT's LoRA on parameters only: no module targets
    try:
        validate_lora_fields(config, where, inits=SHARED_MOE_INITS if peft_type == PEFT_TYPE else LORA_INITS,
                             required=("r",))
    except ConfigError as err:
        raise AdapterFormatError(str(err)) from err
    refused = {
        "use_dora": (config.get("use_dora", False), "DoRA adds magnitude vectors that serving engines do not read"),
        "lora_bias": (config.get("lora_bias", False), "LoRA biases are not part of the shared-outer layout"),
        "bias": (config.get("bias", "none") != "none", "trained base biases are not part of a LoRA adapter"),
        "modules_to_save": (bool(config.get("modules_to_save")), "full module copies cannot be converted"),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise AdapterFormatError(f"{where}: {name}={config[name]!r} is not supported: {why}")
    return LoraSettings(
        peft_type=peft_type,
        r=config["r"],
        lora_alpha=config.get("lora_alpha", 8),
        use_rslora=config.get("use_rslora", False),
        lora_dropout=config.get("lora_dropout", 0.0),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )


# ---- keys and layouts ---------------------------------------------------------------------


def _key_layouts(proj: str, numbered: bool) -> frozenset[str]:
    """The layouts one expert key can belong to (empty: no layout has it)."""
    if numbered:
        return frozenset() if proj == FUSED else frozenset({"per-expert-w" if proj[0] == "w" else "per-expert"})
    if proj[0] == "w":
        return frozenset({"3d"})
    if proj == "down_proj":  # both the 3D-proj and the fused layouts name down this way
        return frozenset({"3d-proj", "fused"})
    return frozenset({"fused" if proj == FUSED else "3d-proj"})


@dataclass
class _Module:
    kind: str  # "experts" or "linear"
    # (projection name as written, "A" or "B") -> expert index (None when not numbered) -> key
    keys: dict[tuple[str, str], dict[Optional[int], str]] = field(default_factory=dict)


def _scan(meta: dict[str, TensorMeta], where: str) -> tuple[dict[str, _Module], str]:
    """Group keys by module and find the adapter's one layout; unknown keys and mixed layouts are errors."""
    modules: dict[str, _Module] = {}
    unknown: list[str] = []
    layouts: Optional[frozenset[str]] = None
    witness = ""
    for key in sorted(meta, key=natural_key):
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        expert_match, linear_match = _EXPERT_KEY.match(name), _LINEAR_KEY.match(name)
        param_match = None if expert_match else _PEFT_PARAM_KEY.match(name)
        if expert_match or param_match:
            if expert_match:
                module, expert, proj, ab = expert_match.group("module", "expert", "proj", "ab")
                expert = None if expert is None else int(expert)
                allowed = _key_layouts(proj, expert is not None)
            else:  # the depth of nesting names the parameter until the shapes and the base say which it is
                module, expert, ab = param_match.group("module"), None, param_match.group("ab")
                proj, allowed = f"param{param_match.group('nest').count('.')}", frozenset({"peft-params"})
            if not allowed:
                unknown.append(key)
                continue
            if layouts is not None and not layouts & allowed:
                raise AdapterFormatError(
                    f"{where}: mixed layouts in one adapter: {key} is in the {' or '.join(sorted(allowed))} layout, "
                    f"but {witness} is in the {' or '.join(sorted(layouts))} layout"
                )
            if layouts is None or layouts & allowed != layouts:
                layouts, witness = (allowed if layouts is None else layouts & allowed), key
            kind = "experts"
        elif linear_match and "experts" not in linear_match.group("module").split("."):
            module, expert, proj, ab, kind = linear_match.group("module"), None, "", linear_match.group("ab"), "linear"
        else:
            unknown.append(key)
            continue
        slot = modules.setdefault(module, _Module(kind)).keys.setdefault((proj, ab), {})
        if expert in slot:
            raise AdapterFormatError(f"{where}: {key} and {slot[expert]} name the same tensor")
        slot[expert] = key
    if unknown:
        raise AdapterFormatError(
            f"{where}: {len(unknown)} unknown tensor(s) (expected LoRA keys like ...experts.w1.lora_A.weight, "
            f"...experts.{{e}}.gate_proj.lora_A.weight or ...q_proj.lora_A.weight):{_listing(unknown)}"
        )
    if layouts is None:
        return modules, "dense"
    return modules, "3d-proj" if "3d-proj" in layouts else next(iter(layouts))


# ---- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a canonical factor's data lives: one tensor (optionally a row range along dim 1 of a
    fused gate_up tensor), or one 2D tensor per expert, stacked along a new dim 0."""

    keys: tuple[str, ...]
    label: str  # how errors name it
    rows: Optional[tuple[int, ...]] = None  # (start, stop[, step]) along dim 1 of the canonical tensor
    stacked: bool = False
    # PEFT's LoRA on a 3D parameter of E experts: A is [r*E, in] (expert index slowest), B is
    # [out, r*E] (expert index fastest); `peft_factor` says which, the tensor is made [E, r, in] or [E, out, r].
    peft_experts: int = 0
    peft_factor: str = ""

    def load(self, reader: Reader, expert: Optional[int] = None) -> torch.Tensor:
        """The canonical tensor, or only `expert`'s part of it (kept 3D: [1, ...])."""
        if self.peft_experts:
            return self._load_peft(reader, expert)
        if self.stacked:
            if expert is not None:
                return reader.load(self.keys[expert]).unsqueeze(0)
            return torch.stack([reader.load(key) for key in self.keys])
        if expert is None and self.rows is None:
            return reader.load(self.keys[0])
        experts = slice(None) if expert is None else slice(expert, expert + 1)
        return reader.load(self.keys[0], (experts, slice(*self.rows) if self.rows else slice(None)))

    def _load_peft(self, reader: Reader, expert: Optional[int]) -> torch.Tensor:
        tensor, num_experts = reader.load(self.keys[0]), self.peft_experts
        if self.peft_factor == "A":
            tensor = tensor.reshape(num_experts, -1, tensor.shape[-1])
        else:
            tensor = tensor.reshape(tensor.shape[0], -1, num_experts).permute(2, 0, 1)
        if self.rows is not None:
            tensor = tensor[:, slice(*self.rows)]
        if expert is not None:
            tensor = tensor[expert : expert + 1]
        return tensor.contiguous()

    def describe(self, expert: Optional[int]) -> str:
        if self.stacked and expert is not None:
            return self.keys[expert]
        return self.label if expert is None else f"{self.label} (expert {expert})"


@dataclass(frozen=True)
class Factor:
    """One canonical tensor: a native factor of one module, with the source of its data."""

    module: str  # module path in the model, e.g. model.layers.0.mlp.experts
    name: str  # "w1.lora_A" ... for an experts block, "lora_A" / "lora_B" for a linear
    source: Source
    meta: TensorMeta  # canonical shape (outer factors: dim 0 is 1 or E) and dtype
    num_experts: int = 0  # E for experts factors, 0 for linear ones

    @property
    def is_expert(self) -> bool:
        return self.num_experts > 0

    @property
    def is_outer(self) -> bool:
        return self.is_expert and self.name in OUTER_FACTORS

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.module}.{self.name}.weight"


def _written_proj(layout: str, native: str) -> str:
    return native if layout in ("3d", "per-expert-w") else PROJECTIONS[native]


def _stacked_source(slot: dict[Optional[int], str], meta: dict[str, TensorMeta], problems: list[str]):
    indices = sorted(slot)
    keys = [slot[e] for e in indices]
    label = re.sub(r"\.experts\.\d+\.", f".experts.{{0..{len(keys) - 1}}}.", keys[0], count=1)
    if indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        problems.append(f"{label}: experts {missing} missing (found {len(indices)} keys, highest index {indices[-1]})")
        return None
    first = meta[keys[0]]
    for key in keys[1:]:
        if meta[key] != first:
            problems.append(f"{key}: {list(meta[key].shape)} {meta[key].dtype}, but {keys[0]} is {list(first.shape)} {first.dtype}")
            return None
    if len(first.shape) != 2:
        problems.append(f"{keys[0]}: expected a 2D per-expert tensor, found shape {list(first.shape)}")
        return None
    return Source(tuple(keys), label, stacked=True), TensorMeta((len(keys), *first.shape), first.dtype)


def _fused_sources(slots, meta, module: str, problems: list[str]) -> dict[str, tuple[Source, TensorMeta]]:
    """Gate and up factors from one `gate_up_proj` pair.

    B is [E, 2I, r] (gate rows first, as in the base weight). A is either [1|E, 2r, H] (gate A and
    up A concatenated along the rank, SGLang's fused form) or [1|E, r, H] (one A that gate and up
    share, PEFT's LoRA on the fused parameter; SGLang repeats it along the rank).
    """
    keys = {ab: slots.get((FUSED, ab), {}).get(None) for ab in "AB"}
    if None in keys.values():
        problems.append(f"{module}: missing {' and '.join(f'{FUSED}.lora_{ab}.weight' for ab, k in keys.items() if k is None)}")
        return {}
    a, b = meta[keys["A"]], meta[keys["B"]]
    if len(a.shape) != 3 or len(b.shape) != 3 or b.shape[1] % 2:
        problems.append(
            f"{keys['A']} {list(a.shape)} / {keys['B']} {list(b.shape)}: expected 3D A [1|E, r or 2r, H] and B [E, 2I, r]"
        )
        return {}
    rank, inter = b.shape[2], b.shape[1] // 2

    def part(key: str, info: TensorMeta, rows: Optional[tuple[int, int]]) -> tuple[Source, TensorMeta]:
        if rows is None:
            return Source((key,), key), info
        shape = (info.shape[0], rows[1] - rows[0], info.shape[2])
        return Source((key,), f"{key}[:, {rows[0]}:{rows[1]}]", rows=rows), TensorMeta(shape, info.dtype)

    if a.shape[1] == rank:
        gate_a = up_a = part(keys["A"], a, None)
    elif a.shape[1] == 2 * rank:
        gate_a, up_a = part(keys["A"], a, (0, rank)), part(keys["A"], a, (rank, 2 * rank))
    else:
        problems.append(f"{keys['A']}: dim 1 is {a.shape[1]}; expected r={rank} or 2r={2 * rank} (r = dim 2 of {keys['B']})")
        return {}
    return {
        "w1.lora_A": gate_a,
        "w1.lora_B": part(keys["B"], b, (0, inter)),
        "w3.lora_A": up_a,
        "w3.lora_B": part(keys["B"], b, (inter, 2 * inter)),
    }


def _peft_param_sources(slots, meta, module: str, experts: Optional[ExpertsLayout],
                        problems: list[str]) -> dict[str, tuple[Source, TensorMeta]]:
    """The six factors from PEFT's LoRA on `gate_up_proj` and `down_proj` (`target_parameters`).

    PEFT's A acts on the parameter's input dim and B on its output dim in the block's own storage:
    gate_up's B rows are the 2I storage columns (concatenated or interleaved, as the base's layout
    says), and gate and up share gate_up's one A. Which pair is which comes from the shapes: gate_up
    maps H -> 2I, down I -> H.
    """
    if experts is None:
        problems.append(f"{module}: the base model has no fused experts block here to read PEFT's expert tensors against")
        return {}
    num_experts, hidden, inter = experts.num_experts, experts.hidden, experts.inter
    pairs: dict[str, dict[str, str]] = {}
    for (proj, ab), slot in slots.items():
        pairs.setdefault(proj, {})[ab] = slot[None]
    found: dict[str, tuple[str, str, int]] = {}
    for proj, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"{module}: {next(iter(pair.values()))} has no lora_{'B' if 'A' in pair else 'A'} beside it")
            continue
        a, b = meta[pair["A"]].shape, meta[pair["B"]].shape
        param = {(hidden, 2 * inter): "gate_up_proj", (inter, hidden): "down_proj"}.get((a[-1], b[0]))
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] % num_experts or param is None or param in found:
            problems.append(
                f"{pair['A']} {list(a)} / {pair['B']} {list(b)}: expected PEFT's [r*E, in] / [out, r*E] LoRA of one "
                f"of gate_up_proj (H={hidden} -> 2I={2 * inter}) or down_proj (I={inter} -> H={hidden}), E={num_experts}"
            )
            continue
        found[param] = (pair["A"], pair["B"], a[0] // num_experts)
    for param in ("gate_up_proj", "down_proj"):
        if param not in found and not problems:
            problems.append(f"{module}: no PEFT LoRA on {param}; the layout has gate, up and down factors, so both "
                            f"gate_up_proj and down_proj must be targets")
    if len(found) < 2:
        return {}

    def source(key: str, factor: str, shape: tuple[int, ...], rows=None, what: str = "") -> tuple[Source, TensorMeta]:
        return (Source((key,), key + what, rows=rows, peft_experts=num_experts, peft_factor=factor),
                TensorMeta(shape, meta[key].dtype))

    (a_gu, b_gu, r_gu), (a_d, b_d, r_d) = found["gate_up_proj"], found["down_proj"]
    gate_rows, up_rows = ((0, 2 * inter, 2), (1, 2 * inter, 2)) if experts.interleaved else ((0, inter), (inter, 2 * inter))
    return {
        "w1.lora_A": source(a_gu, "A", (num_experts, r_gu, hidden)),
        "w3.lora_A": source(a_gu, "A", (num_experts, r_gu, hidden)),
        "w1.lora_B": source(b_gu, "B", (num_experts, inter, r_gu), gate_rows, " (gate rows)"),
        "w3.lora_B": source(b_gu, "B", (num_experts, inter, r_gu), up_rows, " (up rows)"),
        "w2.lora_A": source(a_d, "A", (num_experts, r_d, inter)),
        "w2.lora_B": source(b_d, "B", (num_experts, hidden, r_d)),
    }


def _module_factors(module: str, entry: _Module, layout: str, meta, problems: list[str],
                    experts_of: Callable[[str], Optional[ExpertsLayout]]) -> list[Factor]:
    """The canonical factors of one module, in write order; what is missing goes to `problems`."""
    sources: dict[str, tuple[Source, TensorMeta]] = {}
    if entry.kind == "linear":
        names = direct = ("lora_A", "lora_B")
    elif layout == "peft-params":
        names, direct = EXPERT_FACTORS, ()
        sources.update(_peft_param_sources(entry.keys, meta, module, experts_of(module), problems))
    elif layout == "fused":  # gate and up come from the fused pair, down is read as written
        names, direct = EXPERT_FACTORS, ("w2.lora_A", "w2.lora_B")
        sources.update(_fused_sources(entry.keys, meta, module, problems))
    else:
        names = direct = EXPERT_FACTORS
    per_expert = entry.kind == "experts" and layout in PER_EXPERT_LAYOUTS
    for name in direct:
        ab = name[-1]
        written = _written_proj(layout, name.split(".")[0]) if entry.kind == "experts" else ""
        slot = entry.keys.get((written, ab))
        if slot is None:
            stem = f"{module}{'.{e}' if per_expert else ''}{'.' + written if written else ''}"
            problems.append(f"{module}: missing {PREFIX}{stem}.lora_{ab}.weight")
        elif per_expert:
            found = _stacked_source(slot, meta, problems)
            if found:
                sources[name] = found
        else:
            sources[name] = Source((slot[None],), slot[None]), meta[slot[None]]
    num_experts = 0
    if entry.kind == "experts":  # E from gate B [E, I, r]; a malformed one is reported by the shape check
        gate_b = sources.get("w1.lora_B")
        num_experts = gate_b[1].shape[0] if gate_b and len(gate_b[1].shape) == 3 else 1
    return [Factor(module, name, *sources[name], num_experts) for name in names if name in sources]


def native_targets(factors: list[Factor]) -> list[str]:
    """Target names for the native config: 'experts' and the leaf names of the adapted linears."""
    linear = sorted({f.module.rsplit(".", 1)[-1] for f in factors if not f.is_expert})
    return (["experts"] if any(f.is_expert for f in factors) else []) + linear


def layer_groups(factors: list[Factor]) -> Iterator[list[Factor]]:
    """Consecutive factors grouped by layer (by module outside layers): the unit of one open file."""
    group: list[Factor] = []
    for factor in factors:
        if group and _group_id(group[0].module) != _group_id(factor.module):
            yield group
            group = []
        group.append(factor)
    if group:
        yield group


def _group_id(module: str):
    layer = layer_index(module)
    return module if layer is None else layer


def read_factors(meta: dict[str, TensorMeta], where: str,
                 experts_of: Optional[Callable[[str], Optional[ExpertsLayout]]] = None) -> tuple[str, list[Factor]]:
    """The adapter's layout and its canonical factors in write order (layer by layer, modules sorted);
    unknown keys, mixed layouts and incomplete modules raise, listing every problem. `experts_of`
    gives the base's experts layout of a module path; PEFT's target_parameters layout needs it."""
    if not meta:
        raise AdapterFormatError(f"{where}: the adapter holds no tensors")
    modules, layout = _scan(meta, where)
    if layout == "peft-params" and experts_of is None:
        raise AdapterFormatError(
            f"{where}: a PEFT target_parameters adapter (keys like ...experts.lora_A.weight) is read against its base "
            f"model: pass base= (a config.json or model directory); the base's expert count and its experts' storage "
            f"(gate/up row order) decide where each row goes"
        )
    problems: list[str] = []
    factors = [f for name, entry in modules.items()
               for f in _module_factors(name, entry, layout, meta, problems, experts_of or (lambda module: None))]
    raise_problems(f"{where}: incomplete or inconsistent adapter", problems)
    return layout, sorted(factors, key=lambda f: natural_key(f.module))
