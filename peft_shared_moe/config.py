"""`SharedMoeLoraConfig`: the one object a user fills in to get a shared-outer MoE LoRA adapter.

`validate_lora_fields` is the single gate for LoRA settings, whether they come from Python
(`SharedMoeLoraConfig(...)`, and `PeftModel.from_pretrained`, which builds one from the saved
JSON) or from any adapter_config.json the formats code reads, so a value that one path refuses is
never accepted by another.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Union

from peft.config import PeftConfig
from peft.utils import TaskType



class SharedMoePeftType(str, enum.Enum):
    """Our `peft_type`, shaped like PEFT's own `PeftType` enum (a str with `.value`), which
    transformers and PEFT code expect; it equals, hashes and serialises as the plain string."""

    SHARED_MOE_LORA = "SHARED_MOE_LORA"


PEFT_TYPE = SharedMoePeftType.SHARED_MOE_LORA

# Target names resolved by structure, not by module name: every fused experts block, and every
# nn.Linear directly inside an attention block of the decoder (q/k/v/o_proj, DeepSeek's q_a_proj /
# kv_b_proj / ..., whatever the architecture calls them).
EXPERTS_TARGET = "experts"
ATTENTION_TARGET = "attention"
# What Tinker trains when no targets are named ("all-linear" or None): the experts and the attention
# projections. The router (`gate`), dense MLPs and `lm_head` are never targeted by default.
DEFAULT_TARGET_MODULES = (EXPERTS_TARGET, ATTENTION_TARGET)
# Run-time settings: never saved into adapter_config.json, so a reloaded adapter runs "auto" unless
# the loading code asks otherwise (as PEFT's LoraConfig keeps `runtime_config` out of the file).
RUNTIME_FIELDS = ("backend",)
INCLUDE_ALL_LINEAR = "all-linear"
BACKENDS = ("auto", "torch", "loop", "triton", "torch_fused")
LOADING_NOTE = (
    "## Loading this adapter\n\n"
    "This is a `SHARED_MOE_LORA` adapter (shared-outer MoE LoRA). Run `import peft_shared_moe` before\n"
    "`PeftModel.from_pretrained`, `model.load_adapter` or `AutoModelForCausalLM.from_pretrained`: the import\n"
    "registers the adapter type with PEFT. For serving engines (SGLang, vLLM) export it with\n"
    "`peft-shared-moe convert ADAPTER OUT --to sglang` (or `vllm`)."
)
BIAS_CHOICES = ("none", "all", "lora_only")
# init_lora_weights values: what our tuner implements, and what a plain LoRA adapter may declare and
# still be a pure delta on the original base (other strings, e.g. "pissa", rewrite the base weights).
# PEFT's other LoRA inits are refused: "pissa", "olora", "corda", "loftq" rewrite the base weights (the
# adapter stops being a delta on the original base, which serving engines load it onto); "eva" needs
# activations of a data loader, "orthogonal" and "nora" are defined for one 2D weight, not for factors a
# layer's experts share.
SHARED_MOE_INITS = (True, False, "gaussian")
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
LORA_INITS = (True, False, "gaussian")

# rank_pattern / alpha_pattern keys are regular expressions that PEFT matches (with Python's
# backtracking `re`) as `(.*\.)?(KEY)$` against every module path. A key from a file must not be able
# to stall that: it must be short, must not repeat a group (`(a+)+`, `(a|a)*` backtrack exponentially),
# may not use backreferences or lookarounds, and may hold only a few quantifiers (each one multiplies
# the work by the length of the path).
PATTERN_MAX_CHARS = 256
PATTERN_MAX_QUANTIFIERS = 2
_BRACE_QUANTIFIER = re.compile(r"\{\d*(?:,\d*)?\}")


class ConfigError(ValueError):
    """A LoRA setting with the wrong type or value; the message names where it came from and the key."""


def pattern_problem(pattern: str) -> Optional[str]:
    """Why `pattern` is outside the safe regex subset described above, or None if it is inside."""
    if len(pattern) > PATTERN_MAX_CHARS:
        return f"is longer than {PATTERN_MAX_CHARS} characters"
    try:
        re.compile(pattern)
    except re.error as err:
        return f"is not a valid regular expression ({err})"
    quantifiers, after_group, i = 0, False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if pattern[i + 1 : i + 2].isdigit() and pattern[i + 1] != "0":
                return "uses a backreference"
            i, after_group = i + 2, False
            continue
        if char == "[":  # a class is one atom; `]` right after `[` or `[^` is a literal
            i += 2 if pattern[i + 1 : i + 2] == "^" else 1
            i += 1 if pattern[i : i + 1] == "]" else 0
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i, after_group = i + 1, False
            continue
        brace = _BRACE_QUANTIFIER.match(pattern, i) if char == "{" else None
        if char in "*+?" or brace:
            if after_group:
                return "repeats a group (nested or alternated repetition backtracks exponentially)"
            quantifiers += 1
            i = brace.end() if brace else i + 1
            i += 1 if pattern[i : i + 1] in ("?", "+") else 0  # lazy or possessive suffix
            continue
        if char == "(" and pattern.startswith(("(?=", "(?!", "(?<=", "(?<!", "(?P="), i):
            return "uses a lookaround or a backreference"
        after_group = char == ")"
        i += 1
    if quantifiers > PATTERN_MAX_QUANTIFIERS:
        return f"has {quantifiers} quantifiers (at most {PATTERN_MAX_QUANTIFIERS})"
    return None


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _is_layer_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_names(value: Any) -> bool:
    return isinstance(value, (list, tuple, set)) and bool(value) and all(isinstance(v, str) and v for v in value)


def _one_of(choices: tuple) -> Callable[[Any], bool]:
    """Membership that does not let 1 pass for True or 0 for False; str enums (PEFT's TaskType) count as str."""
    return lambda value: any(
        value == choice and isinstance(value, bool) == isinstance(choice, bool) for choice in choices
    )


# field -> (check, what is expected); a field absent from the values is not checked (its default is valid).
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (_is_positive_int, "a positive integer"),
    "lora_alpha": (_is_positive_number, "a finite positive number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (_is_bool, "true or false"),
    "shared_outer": (_is_bool, "true or false"),
    "use_dora": (_is_bool, "true or false"),
    "lora_bias": (_is_bool, "true or false"),
    "inference_mode": (_is_bool, "true or false"),
    "bias": (_one_of(BIAS_CHOICES), f"one of {list(BIAS_CHOICES)}"),
    "backend": (_one_of(BACKENDS), f"one of {list(BACKENDS)}"),
    "target_modules": (lambda v: v is None or (isinstance(v, str) and bool(v)) or _is_names(v),
                       "null, a non-empty name, or a non-empty list of non-empty names"),
    "modules_to_save": (lambda v: v is None or isinstance(v, (list, tuple)) and all(isinstance(n, str) and n for n in v),
                        "null or a list of module names"),
    "task_type": (lambda v: v is None or _one_of(tuple(t.value for t in TaskType))(v),
                  f"null or one of {[t.value for t in TaskType]}"),
    "base_model_name_or_path": (_is_optional_str, "null or a string"),
    "layers_to_transform": (lambda v: v is None or _is_layer_index(v) or (
        isinstance(v, (list, tuple)) and bool(v) and all(_is_layer_index(i) for i in v)),
        "null, a layer index or a non-empty list of layer indexes (integers >= 0)"),
    "layers_pattern": (lambda v: v is None or (isinstance(v, str) and bool(v)) or _is_names(v),
                       "null, a name or a non-empty list of names"),
}
_PATTERNS = {"rank_pattern": (_is_positive_int, "a positive integer"),
             "alpha_pattern": (_is_positive_number, "a finite positive number")}


def validate_lora_fields(
    values: Mapping[str, Any], where: str, *, inits: tuple = SHARED_MOE_INITS, required: Iterable[str] = ()
) -> None:
    """Raise `ConfigError` naming `where` and the key for the first LoRA setting with a wrong type or value.

    JSON gives strings where Python code would give bools ("false" is truthy), and NaN / Infinity
    where numbers are expected; every such value is refused here instead of being coerced.
    `inits`: the accepted `init_lora_weights` values; `required`: keys that must be present.
    """
    for key in required:
        if key not in values:
            raise ConfigError(f"{where}: {key} is missing")
    for key, (check, expected) in _FIELDS.items():
        if key in values and not check(values[key]):
            raise ConfigError(f"{where}: {key} must be {expected}, found {values[key]!r}")
    if "init_lora_weights" in values and not _one_of(inits)(values["init_lora_weights"]):
        value = values["init_lora_weights"]
        why = " (it rewrites the base weights, so the adapter is no longer a delta on the original base)"
        raise ConfigError(
            f"{where}: init_lora_weights must be one of {list(inits)}, found {value!r}"
            + (why if value in BASE_REWRITING_INITS else "")
        )
    patterns = values.get("layers_pattern")
    for pattern in [patterns] if isinstance(patterns, str) else patterns or ():
        problem = pattern_problem(pattern)
        if problem:
            raise ConfigError(f"{where}: layers_pattern {pattern[:80]!r} is refused: it {problem}")
    if isinstance(values.get("target_modules"), str) and values.get("layers_to_transform") is not None:
        # as PEFT >= 0.22 rules: a str target (a regex for PEFT, a keyword here) with layer indexes is ambiguous
        raise ConfigError(f"{where}: layers_to_transform cannot be used when target_modules is a str; give a list")
    for key, (check, expected) in _PATTERNS.items():
        pattern = values.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, Mapping):
            raise ConfigError(f"{where}: {key} must be an object (module pattern -> value), found {pattern!r}")
        for module, value in pattern.items():
            if not isinstance(module, str) or not module:
                raise ConfigError(f"{where}: {key} keys must be non-empty strings, found {module!r}")
            problem = pattern_problem(module)
            if problem:
                raise ConfigError(
                    f"{where}: {key} key {module[:80]!r} is refused: it {problem}; expected a pattern of at most "
                    f"{PATTERN_MAX_CHARS} characters with at most {PATTERN_MAX_QUANTIFIERS} quantifiers, none on a group, "
                    f"and no backreferences or lookarounds (a form that cannot backtrack for long)"
                )
            if not check(value):
                raise ConfigError(f"{where}: {key}[{module!r}] must be {expected}, found {value!r}")


@dataclass
class SharedMoeLoraConfig(PeftConfig):
    """Configuration of a shared-outer (or per-expert) MoE LoRA adapter.

    Each field's meaning lives in its `help` metadata, so the docs have a single source.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank, the same for expert and dense-linear factors."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: the delta is scaled by lora_alpha / r."})
    use_rslora: bool = field(
        default=False, metadata={"help": "Scale by lora_alpha / sqrt(r) instead of lora_alpha / r (rank-stabilised)."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Module names to adapt. 'experts' targets every fused experts block (recognised by structure: "
                "3D gate_up_proj [E, 2I, H] and down_proj [E, H, I]); 'attention' every nn.Linear directly inside "
                "an attention block of the decoder (q/k/v/o_proj, or DeepSeek's q_a_proj, kv_b_proj, ...); any other "
                "name targets nn.Linear layers whose name is it or ends with '.' + it. None or 'all-linear': "
                "['experts', 'attention'], kept as given in the saved config."
            )
        },
    )
    shared_outer: bool = field(
        default=True,
        metadata={
            "help": (
                "True: gate A, up A and down B are one tensor shared by the experts of a layer (the SGLang/Tinker "
                "layout). False: all four factors are per expert."
            )
        },
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of dense-linear LoRA only."})
    init_lora_weights: Union[bool, Literal["gaussian"]] = field(
        default=True,
        metadata={"help": "True: A random (Kaiming-uniform), B zero, so a fresh adapter is the identity. 'gaussian': "
                          "A ~ N(0, 1/r), B zero, as PEFT's LoRA. False: both random (tests)."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Adapt only the targets in these decoder layers, as PEFT's LoRA: the index is the number "
                          "after `layers_pattern` in the module path (e.g. model.layers.7.mlp.experts)."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "The name of the layer list `layers_to_transform` counts in (e.g. 'layers'); None: the "
                          "first number in the path."},
    )
    backend: Literal["auto", "torch", "loop", "triton", "torch_fused"] = field(
        default="auto",
        metadata={
            "help": (
                "Experts compute path, a run-time choice that is not saved with the adapter (a reload runs 'auto'; "
                "pass SharedMoeLoraConfig.from_pretrained(path, backend=...) as `config=` to choose). 'torch': "
                "grouped GEMMs with autograd (exact per-expert loop where grouped_mm cannot run, e.g. float64); "
                "'loop': always the per-expert loop; 'triton': the fused Triton kernels, for inference and training "
                "(refuses a call they cannot compute exactly); 'torch_fused': training as one autograd function with "
                "a hand-written backward that keeps fewer activations (frozen base, [gate; up] SiLU experts; refuses "
                "others); 'auto': the Triton kernels on CUDA where they are exact, torch otherwise."
            )
        },
    )
    bias: Literal["none", "all", "lora_only"] = field(
        default="none",
        metadata={
            "help": (
                "Biases to train and save, as in PEFT's LoraConfig: 'none'; 'all' (every bias of the model); "
                "'lora_only' (the biases of the adapted layers)."
            )
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save, as in PEFT's LoRA."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        validate_lora_fields({f.name: getattr(self, f.name) for f in fields(self)}, type(self).__name__)
        if isinstance(self.target_modules, (tuple, set)):  # PEFT saves lists; a set gets a stable order
            names = self.target_modules
            self.target_modules = sorted(names) if isinstance(names, set) else list(names)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Also tell the reader of the adapter's README (which PEFT writes first) how to load it."""
        super().save_pretrained(save_directory, **kwargs)
        readme = Path(save_directory) / "README.md"
        text = readme.read_text(encoding="utf-8") if readme.exists() else ""
        if LOADING_NOTE not in text:
            readme.write_text(text.rstrip("\n") + ("\n\n" if text else "") + LOADING_NOTE + "\n", encoding="utf-8")

    def to_dict(self) -> dict:
        values = super().to_dict()
        for name in RUNTIME_FIELDS:
            values.pop(name, None)
        return values

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        # An adapter saved by an earlier version may hold a backend: the reload still runs the default.
        values = super().from_json_file(path_json_file, **kwargs)
        return {k: v for k, v in values.items() if k not in RUNTIME_FIELDS}

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def in_selected_layers(self, key: str) -> bool:
        """Whether the module at path `key` lies in a layer `layers_to_transform` selects (PEFT's matching)."""
        indexes = self.layers_to_transform
        if indexes is None:
            return True
        indexes = {indexes} if isinstance(indexes, int) else set(indexes)
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
        return match is not None and int(match["idx"]) in indexes

    def resolved_target_modules(self) -> list[str]:
        """The explicit target names, with the None / 'all-linear' shorthand expanded."""
        if self.target_modules is None:
            return list(DEFAULT_TARGET_MODULES)
        if isinstance(self.target_modules, str):
            if self.target_modules.lower() == INCLUDE_ALL_LINEAR:
                return list(DEFAULT_TARGET_MODULES)
            return [self.target_modules]
        return list(self.target_modules)
