"""One name per LoRA factor of an experts block, shared by the tuner, the ops and the formats.

The name is the serving engines' key (docs/LAYOUTS.md): `w1` = gate_proj, `w3` = up_proj,
`w2` = down_proj, each with `lora_A` and `lora_B`. It is also the in-model path: an adapted
experts block holds `experts.w1.lora_A[adapter].weight`, so the saved key
`experts.w1.lora_A.weight` is PEFT's ordinary "drop the adapter name" of the module key, and
PEFT's and transformers' own key mappings load it with no special case.

Shapes (E experts, hidden H, expert intermediate I, rank r); dim 0 is 1 for a shared factor:

| factor      | shape           | shared-outer |
| ----------- | --------------- | ------------ |
| w1.lora_A   | (1 or E, r, H)  | shared       |
| w1.lora_B   | (E, I, r)       |              |
| w3.lora_A   | (1 or E, r, H)  | shared       |
| w3.lora_B   | (E, I, r)       |              |
| w2.lora_A   | (E, r, I)       |              |
| w2.lora_B   | (1 or E, H, r)  | shared       |
"""

from __future__ import annotations

# Serving projection name -> transformers' per-expert projection name.
PROJECTIONS: dict[str, str] = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
SIDES = ("lora_A", "lora_B")
# Every expert factor, in the order files are written.
EXPERT_FACTORS: tuple[str, ...] = tuple(f"{proj}.{side}" for proj in PROJECTIONS for side in SIDES)
# The factors that touch the hidden size: one tensor for all experts of a layer in the shared-outer layout.
OUTER_FACTORS: tuple[str, ...] = ("w1.lora_A", "w3.lora_A", "w2.lora_B")
# Tensor parallelism: the dim along which each per-expert factor is split over ranks (it follows the
# base's packed-colwise gate_up_proj and rowwise down_proj); the outer factors are replicated.
TP_SPLIT_DIM: dict[str, int] = {"w1.lora_B": 1, "w3.lora_B": 1, "w2.lora_A": 2}


def factor_shape(factor: str, num_experts: int, hidden: int, inter: int, r: int, shared: bool) -> tuple[int, int, int]:
    """The shape of `factor` for an (E, H, I) experts block at rank r."""
    outer = 1 if shared and factor in OUTER_FACTORS else num_experts
    proj, side = factor.split(".")
    in_dim, out_dim = (inter, hidden) if proj == "w2" else (hidden, inter)
    return (outer, r, in_dim) if side == "lora_A" else (outer, out_dim, r)


def fan_in(factor: str, hidden: int, inter: int, r: int) -> int:
    """The input width of the product a factor computes (A: the projection's input, B: the rank)."""
    proj, side = factor.split(".")
    if side == "lora_B":
        return r
    return inter if proj == "w2" else hidden
