"""`SharedMoeLoraConfig`: the one object a user fills in to get a shared-outer MoE LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

PEFT_TYPE = "SHARED_MOE_LORA"

# What Tinker trains when no targets are named: every experts block plus the attention projections.
# The router (`gate`) and `lm_head` are never targeted by default.
DEFAULT_TARGET_MODULES = ("experts", "q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS_TARGET = "experts"
BACKENDS = ("auto", "torch", "loop", "triton")


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
                "3D gate_up_proj [E, 2I, H] and down_proj [E, H, I]); any other name targets nn.Linear layers whose "
                "name is it or ends with '.' + it. None or 'all-linear': every experts block and q/k/v/o_proj."
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
    init_lora_weights: bool = field(
        default=True,
        metadata={"help": "True: A random (Kaiming-uniform), B zero, so a fresh adapter is the identity. False: both random."},
    )
    backend: Literal["auto", "torch", "loop", "triton"] = field(
        default="auto",
        metadata={
            "help": (
                "Experts compute path. 'torch': grouped GEMMs with autograd (exact per-expert loop where grouped_mm "
                "cannot run, e.g. float64); 'loop': always the per-expert loop; 'triton': the fused inference "
                "kernels (no autograd); 'auto': Triton for CUDA inference, torch otherwise."
            )
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save, as in PEFT's LoRA."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"SharedMoeLoraConfig.r must be a positive integer, got {self.r!r}")
        if not self.lora_alpha or self.lora_alpha <= 0:
            raise ValueError(f"SharedMoeLoraConfig.lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"SharedMoeLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SharedMoeLoraConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"SharedMoeLoraConfig.target_modules must be non-empty names, got {self.target_modules!r}"
                )

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def resolved_target_modules(self) -> list[str]:
        """The explicit target names, with the None / 'all-linear' shorthand expanded."""
        if self.target_modules is None:
            return list(DEFAULT_TARGET_MODULES)
        if isinstance(self.target_modules, str):
            if self.target_modules.lower() == "all-linear":
                return list(DEFAULT_TARGET_MODULES)
            return [self.target_modules]
        return list(self.target_modules)
