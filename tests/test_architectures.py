"""Every fused experts class transformers registers: adapted exactly on the torch path, or refused.

For each architecture a tiny random float64 model is wrapped by `get_peft_model` with random
non-zero factors, and its logits are compared with an independent reference: a deep copy of the
base model whose expert weights get W + s B A added by this file's own placement code (from the
module's flags, not from the library's `storage_deltas`), run with the model's own eager experts.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
import transformers
from packaging.version import Version
from peft import get_peft_model
from transformers import PreTrainedModel

from peft_shared_moe import SharedMoeLoraConfig
from tests.conftest import randomize_adapter

VOCAB = 96

# Sizes every tiny config gets where the config has the attribute (hidden 32, 2 layers, 6 experts).
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, expert_ffn_hidden_size=16,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6,
    num_local_experts=6, n_routed_experts=6, num_experts_per_tok=2, moe_topk=2, first_k_dense_replace=0,
    n_group=1, topk_group=1, max_position_embeddings=64, decoder_sparse_step=1, mlp_only_layers=[],
    n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    qk_head_dim=8, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


@dataclass(frozen=True)
class Case:
    model_type: str
    overrides: dict = field(default_factory=dict)
    refused: Optional[str] = None  # a regex the refusal must match (it also names the experts class)
    skip: Optional[str] = None
    tol: float = 1e-9  # looser only where the module's own code rounds to float32
    float32_params: Optional[str] = None  # parameters the model's own code keeps in float32 (routers)


# Multi-head latent attention: the rotary part is head_dim wide; some need as many KV heads as heads.
MLA = {"head_dim": 4}
MLA_HEADS = {"head_dim": 4, "num_key_value_heads": 4}
# Hybrid models: the torch fallback of their linear attention takes seconds; the experts are the same.
FULL_ATTENTION = {"layer_types": ["full_attention"] * 2}


CASES = [
    Case("afmoe"),
    Case("aria"),  # transposed (E, H, 2I)
    Case("axk1", MLA),
    Case("axk2", MLA_HEADS),
    Case("beam", {"mlp_layer_types": ["dense", "sparse"]}, tol=1e-6),  # own _apply_gate: in float32
    Case("cohere2_moe"),
    Case("deepseek_v2"),
    Case("deepseek_v3", MLA),
    Case("deepseek_v32", MLA_HEADS),
    Case("deepseek_v4"),  # own _apply_gate: clamped SwiGLU
    Case("dots1"),
    Case("ernie4_5_moe"),
    Case("exaone_moe"),
    Case("flex_olmo"),
    Case("flint"),
    Case("glm4_moe"),
    Case("glm4_moe_lite", MLA_HEADS),
    Case("glm5_next", {"num_key_value_heads": 4, "qk_rope_head_dim": 0, "qk_nope_head_dim": 8, "head_dim": 0,
                       "index_head_dim": 8, "index_n_heads": 2, "index_topk": 16, "index_kpool": 4,
                       "linear_num_heads": 4, "linear_head_dim": 8, "mlp_layer_types": ["dense", "sparse"]}),  # own _apply_gate: clamped SiLU
    Case("glm_moe_dsa", MLA_HEADS),
    Case("gpt_oss"),  # transposed, interleaved, biased, own _apply_gate
    Case("granitemoe"),
    Case("granitemoe_swa"),
    Case("granitemoeshared"),
    Case("hunyuan_v1_moe"),
    Case("hy_v3"),
    Case("hy_v4"),  # own _apply_gate
    Case("inkling"),
    # own _apply_gate: act_fn(gate, up); its router runs in float32, so its weights round to float32
    Case("inkling2", float32_params=r"mlp\.gate\.weight$", tol=1e-6),
    Case("kolibri1"),
    Case("laguna"),
    Case("lara_mini"),
    Case("lfm2_moe", {"layer_types": ["conv", "full_attention"], "num_dense_layers": 0}),
    Case("mellum"),
    Case("mimo_v2_flash"),
    Case("minimax"),
    Case("minimax_m2"),
    Case("minimax_m3_vl"),  # own _apply_gate: GPT-OSS style, concatenated
    Case("mistral4"),
    Case("mistral_large4", MLA_HEADS),
    Case("mixtral"),
    Case("olmoe"),
    # transposed, biased, concatenated, own _apply_gate; its eager forward sums experts in float32
    Case("openai_privacy_filter", tol=1e-6),
    Case("phimoe"),
    Case("qwen2_moe"),
    Case("qwen3_5_moe", FULL_ATTENTION),
    Case("qwen3_moe"),
    Case("qwen3_next", FULL_ATTENTION),
    Case("qwen3_vl_moe"),
    Case("solar_open"),
    Case("step3p7", {"sliding_window": 16, "moe_layers_enum": [0, 1]}),  # no experts flags (undecorated), own _apply_gate, read from its shapes
    Case("muse_spark", refused=r"MuseSparkExperts.*has_post_expert_norm"),
    Case("nemotron_h", refused=r"NemotronHExperts.*has_gate=False"),
    Case("llama4", refused=r"Llama4TextExperts.*forward does not take"),
    # Before 5.25 its identity ("zero") experts were routed into the experts block; 5.25 handles them in
    # the MoE block (routes to expert 0 with weight 0), and the experts block is a plain one.
    Case("longcat_flash", {"zero_expert_num": 2, **MLA_HEADS},
         refused=r"LongcatFlashExperts.*fit neither" if Version(transformers.__version__) < Version("5.25") else None),
]


def _model_class(model_type: str) -> type[PreTrainedModel]:
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ModuleNotFoundError:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    classes = {
        name: cls
        for name, cls in vars(module).items()
        if inspect.isclass(cls) and issubclass(cls, PreTrainedModel) and cls.__module__ == module.__name__
    }
    for pattern in (r"ForCausalLM$", r"Text.*Model$", r"[^d]Model$"):
        hits = sorted(n for n in classes if re.search(pattern, n) and "Conditional" not in n)
        if hits:
            return classes[hits[0]]
    raise LookupError(f"no causal LM class in {module.__name__}")


def _tiny_config(cls: type[PreTrainedModel], overrides: dict):
    config_cls = cls.config_class
    defaults = config_cls()
    sizes = {k: v for k, v in {**TINY, **overrides}.items() if hasattr(defaults, k) or k in overrides}
    config = config_cls(**sizes)
    config._experts_implementation = "eager"  # float64 reference: transformers' grouped_mm has no float64
    return config


_BUILT: dict[str, PreTrainedModel] = {}


def build(case: Case) -> PreTrainedModel:
    """A tiny random float64 model; non-trivial routers, expert weights and expert biases."""
    if case.model_type not in _BUILT:
        cls = _model_class(case.model_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = cls(_tiny_config(cls, case.overrides)).to(torch.float64).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".experts." in name or re.search(r"(gate|router)\.(weight|bias)$", name):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
            if case.float32_params:
                for name, p in model.named_parameters():
                    if re.search(case.float32_params, name):
                        p.data = p.data.float()
        _BUILT[case.model_type] = model
    fused = (getattr(m, "down_proj", None) for m in _BUILT[case.model_type].modules())  # every fused block has it
    if not any(isinstance(w, torch.Tensor) and w.dim() == 3 for w in fused):
        # e.g. Aria before transformers fused its experts: not a fused experts class in this version
        pytest.skip(f"{case.model_type} has no fused 3D experts in transformers {transformers.__version__}")
    return copy.deepcopy(_BUILT[case.model_type])


def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def output(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=input_ids(), use_cache=False)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def weights_with_deltas(experts: torch.nn.Module, f: dict[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    """gate_up_proj and down_proj of `experts` with s B A added, placed from the module's flags.

    Written here, independently of the library's `ExpertsLayout.storage_deltas`: gate rows of the
    (E, 2I, H) view are the first I (concatenated) or the even ones (is_concatenated=False), and a
    transposed module (is_transposed=True, or an undecorated one stored (E, H, 2I)) stores that view
    transposed. Differentiable in the factors `f` (saved keys, shared factors with dim 0 == 1).
    """
    gate = s * torch.einsum("eir,erh->eih", f["w1.lora_B"], f["w1.lora_A"].expand(f["w1.lora_B"].shape[0], -1, -1))
    up = s * torch.einsum("eir,erh->eih", f["w3.lora_B"], f["w3.lora_A"].expand(f["w3.lora_B"].shape[0], -1, -1))
    down = s * torch.einsum("ehr,eri->ehi", f["w2.lora_B"].expand(f["w2.lora_A"].shape[0], -1, -1), f["w2.lora_A"])
    num_experts, inter, hidden = gate.shape
    # No flag (an undecorated class): transposed when the shapes say (E, H, 2I) and (E, I, H).
    stored_transposed = (experts.gate_up_proj.shape[1:], experts.down_proj.shape[1:]) == (
        (hidden, 2 * inter),
        (inter, hidden),
    )
    transposed = getattr(experts, "is_transposed", stored_transposed)
    if getattr(experts, "is_concatenated", True):
        gate_up_delta = torch.cat([gate, up], dim=1)  # (E, 2I, H)
    else:
        gate_up_delta = torch.stack([gate, up], dim=2).flatten(1, 2)  # rows g0, u0, g1, u1, ...
    gate_up = experts.gate_up_proj.detach()
    down_weight = experts.down_proj.detach()
    if transposed:
        return {"gate_up_proj": gate_up + gate_up_delta.transpose(1, 2), "down_proj": down_weight + down.transpose(1, 2)}
    return {"gate_up_proj": gate_up + gate_up_delta, "down_proj": down_weight + down}


def adapted_layers(peft_model) -> list[tuple[str, torch.nn.Module]]:
    """(module path in the base model, ExpertsLoraLayer) of every adapted experts block."""
    return [(n, m) for n, m in peft_model.base_model.model.named_modules() if type(m).__name__ == "ExpertsLoraLayer"]


def reference_with_deltas(base: PreTrainedModel, peft_model) -> PreTrainedModel:
    """The base model with s B A written into its expert weights (`weights_with_deltas`)."""
    ref = copy.deepcopy(base)
    for name, layer in adapted_layers(peft_model):
        experts = ref.get_submodule(name)
        f = {k: v.detach() for k, v in layer.factors("default").tensors.items()}
        for param, value in weights_with_deltas(experts, f, layer.scaling["default"]).items():
            getattr(experts, param).data.copy_(value)
    return ref


def adapt(model: PreTrainedModel, shared: bool, seed: int = 3, r: int = 3, backend: str = "torch"):
    config = SharedMoeLoraConfig(
        r=r, lora_alpha=5, target_modules=["experts"], shared_outer=shared, init_lora_weights=False, backend=backend
    )
    peft_model = get_peft_model(model, config)
    randomize_adapter(peft_model, seed=seed)
    return peft_model


def _param(case: Case):
    marks = [pytest.mark.skip(reason=case.skip)] if case.skip else []
    return pytest.param(case, id=case.model_type, marks=marks)


SUPPORTED = [_param(c) for c in CASES if not c.refused]
REFUSED = [_param(c) for c in CASES if c.refused]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
@pytest.mark.parametrize("case", SUPPORTED)
def test_adapted_model_matches_independent_reference(case: Case, shared: bool):
    base = build(case)
    want_base = output(base)
    peft_model = adapt(build(case), shared)
    layers = [m for _, m in adapted_layers(peft_model)]
    assert layers, f"{case.model_type}: no experts block was adapted"
    got = output(peft_model)
    want = output(reference_with_deltas(base, peft_model))
    assert rel_err(got, want) <= case.tol
    assert rel_err(got, want_base) > 1e-4  # the adapter really changes the output

    # Each factor matters: a change to one factor of one layer changes the output.
    # (A random change: a constant added to w2.lora_B shifts every hidden unit alike, which a
    # LayerNorm after the block removes exactly.)
    factor = layers[0].factor_params("default")["w2.lora_B" if shared else "w1.lora_A"]
    with torch.no_grad():
        factor.add_(torch.randn(factor.shape, generator=torch.Generator().manual_seed(9), dtype=factor.dtype))
    changed = output(peft_model)
    assert rel_err(changed, got) > 1e-6
    assert rel_err(changed, output(reference_with_deltas(base, peft_model))) <= case.tol

    # Merging writes the same deltas into the storage (ExpertsLayout.storage_deltas).
    merged = peft_model.merge_and_unload()
    assert rel_err(output(merged), changed) <= case.tol


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
@pytest.mark.parametrize("case", SUPPORTED)
def test_float32_training_gradients_match_float64_reference(case: Case, shared: bool):
    """Training on the default backend in float32: every factor's gradient against the float64
    reference model (base weights + s B A, differentiated by autograd through the model's own eager
    experts). r=8 keeps the factors 16-byte aligned, so torch's grouped_mm runs where it can."""
    base = build(case)
    peft_model = adapt(copy.deepcopy(base).float(), shared, r=8, backend="auto")
    ids = input_ids()
    projection = torch.randn(output(base).shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = peft_model(input_ids=ids, use_cache=False)
    out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    (out.double() * projection).sum().backward()

    ref = copy.deepcopy(base)
    replaced, factors = {}, {}
    for name, layer in adapted_layers(peft_model):
        f = {k: v.detach().double().requires_grad_() for k, v in layer.factor_params("default").items()}
        factors[name] = f
        for param, value in weights_with_deltas(ref.get_submodule(name), f, layer.scaling["default"]).items():
            replaced[f"{name}.{param}"] = value
    want = torch.func.functional_call(ref, replaced, args=(), kwargs=dict(input_ids=ids, use_cache=False))
    want = want.logits if getattr(want, "logits", None) is not None else want.last_hidden_state
    (want * projection).sum().backward()

    checked = 0
    for name, layer in adapted_layers(peft_model):
        for factor, param in layer.factor_params("default").items():
            expected = factors[name][factor].grad
            assert param.grad is not None and expected is not None, f"{name}.{factor}: no gradient"
            assert expected.norm() > 0, f"{name}.{factor}: the reference gradient is zero"
            assert rel_err(param.grad.double(), expected) <= 1e-4, f"{name}.{factor}"
            checked += 1
    assert checked == 6 * len(factors)


@pytest.mark.parametrize("case", SUPPORTED)
def test_default_targets_adapt_the_experts_and_the_attention(case: Case):
    """target_modules=None ("all-linear" likewise): every experts block and every linear directly inside
    the decoder's attention blocks, whatever the architecture names them (DeepSeek's q_a_proj ...); never
    a router, a dense MLP or lm_head."""
    model = build(case)
    attention_linears = {n for n, m in model.named_modules() if type(m).__name__.endswith(("Attention", "MLA"))
                         for c, child in m.named_children() if isinstance(child, torch.nn.Linear)}
    peft_model = get_peft_model(model, SharedMoeLoraConfig(r=2))
    wrapped = {n: type(m).__name__ for n, m in peft_model.base_model.model.named_modules()
               if type(m).__name__ in ("ExpertsLoraLayer", "LinearLoraLayer")}
    assert "ExpertsLoraLayer" in wrapped.values()
    linears = [n for n, kind in wrapped.items() if kind == "LinearLoraLayer"]
    assert linears, f"{case.model_type}: no attention projection adapted"
    assert all(n.rpartition(".")[0] in attention_linears for n in linears)
    assert not any(re.search(r"(router|\.gate|lm_head|mlp\.(gate|up|down)_proj)$", n) for n in linears)


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_experts_are_refused(case: Case):
    with pytest.raises(ValueError, match=case.refused):
        adapt(build(case), shared=True)
