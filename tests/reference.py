"""Independent references written from the formula of docs/MATH.md, in float64, for the tests only.

Nothing here imports the library: a bug in the library cannot hide in its own reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_moe_lora(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    factors: dict[str, torch.Tensor] | None,
    scaling: float,
) -> torch.Tensor:
    """y_t = sum_k w_k ( W_down[e] h + s B_down (A_down[e] h) ), one token and one expert at a time.

    `factors` uses the saved keys "w1.lora_A" ... "w2.lora_B"; a shared factor has dim 0 == 1.
    """
    d = torch.float64
    x, w = x.to(d), top_k_weights.to(d)
    gate_up_proj, down_proj = gate_up_proj.to(d), down_proj.to(d)
    f = {k: v.to(d) for k, v in (factors or {}).items()}
    inter = down_proj.shape[-1]

    def pick(name: str, e: int) -> torch.Tensor:
        t = f[name]
        return t[0] if t.shape[0] == 1 else t[e]

    out = torch.zeros(x.shape[0], down_proj.shape[1], dtype=d)
    for t in range(x.shape[0]):
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            g = gate_up_proj[e, :inter] @ x[t]
            u = gate_up_proj[e, inter:] @ x[t]
            if f:
                g = g + scaling * (pick("w1.lora_B", e) @ (pick("w1.lora_A", e) @ x[t]))
                u = u + scaling * (pick("w3.lora_B", e) @ (pick("w3.lora_A", e) @ x[t]))
            h = F.silu(g) * u
            o = down_proj[e] @ h
            if f:
                o = o + scaling * (pick("w2.lora_B", e) @ (pick("w2.lora_A", e) @ h))
            out[t] += w[t, k] * o
    return out


def merged_state_dict(base_state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scaling: float) -> dict:
    """Base weights with the saved adapter folded in (W + s B A), from the saved key layout alone."""
    merged = {k: v.clone().to(torch.float64) for k, v in base_state.items()}
    prefix = "base_model.model."
    for key in adapter:
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len(prefix) : -len(".lora_A.weight")]
        A = adapter[key].to(torch.float64)
        B = adapter[key.replace("lora_A", "lora_B")].to(torch.float64)
        if module.endswith(("experts.w1", "experts.w3", "experts.w2")):
            experts, which = module.rsplit(".", 1)
            delta = scaling * torch.matmul(B, A)  # (E, out, in), shared factors broadcast
            if which == "w2":
                merged[f"{experts}.down_proj"] += delta
            else:
                inter = delta.shape[1]
                rows = slice(0, inter) if which == "w1" else slice(inter, 2 * inter)
                merged[f"{experts}.gate_up_proj"][:, rows] += delta
        else:
            merged[f"{module}.weight"] += scaling * (B @ A)
    return merged
