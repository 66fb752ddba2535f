"""Tiny random DeepSeek-V3, GLM-4.5 and gpt-oss models and real PEFT adapters on them, built
from configs in memory (no downloads): the transformers + PEFT references of the family tests.

    model = make_family_model("deepseek_v3", seed=0)      # fp32, eval, eager experts
    peft = make_family_adapter(make_family_model(...), "full", tmp / "a1", seed=1)

Sizes (hidden 32, 4 heads, 8 or 4 experts, top-3 / top-2, 3 layers, vocab 128) split on every
layout the launcher tests use: tp 4 gives one MLA head per rank and replicates GLM / gpt-oss's
2 kv heads; ep 2 halves the experts; moe_tp 2 halves I = 24; shared and dense intermediates
divide by 4. Each config turns on what its family is known for, at values that make it
matter at this size:

- DeepSeek-V3: MLA with ``q_lora_rank`` (v_head_dim 10 != qk_head_dim 20), YaRN with
  ``mscale`` != ``mscale_all_dim`` (the cos/sin factor and the softmax factor both differ
  from 1), interleaved rope, 2 shared experts, 4 groups keep 2, layer 0 dense;
- GLM-4.5: q/k/v biases, q/k norm, partial rotary (0.5: the field is left to its default),
  1 of 2 groups, layer 0 dense;
- gpt-oss: sinks, sliding window 4 on layers 0 and 2, YaRN (factor 8 over 32 positions, no
  truncation), clamped SwiGLU at ``swiglu_limit=1.0`` (7.0 never clamps at these scales).

transformers initializes some parameters to zero (correction bias, expert biases) or small;
:func:`make_family_model` redraws them so that dropping one changes the output.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tests.hf_factory import _COMMON

FAMILIES = ("deepseek_v3", "glm4_moe", "gpt_oss")

FAMILY_CONFIG = {
    "deepseek_v3": dict(
        num_hidden_layers=3, num_key_value_heads=4, intermediate_size=48,
        moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=12,
        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, max_position_embeddings=256,
        rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}),
    "glm4_moe": dict(
        num_hidden_layers=3, head_dim=8, intermediate_size=48, moe_intermediate_size=24,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=2, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=True,
        attention_bias=True, use_qk_norm=True),
    "gpt_oss": dict(
        num_hidden_layers=3, head_dim=8, intermediate_size=24, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4, swiglu_limit=1.0, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 32}),
}


def _config_class(family: str):
    from transformers import DeepseekV3Config, Glm4MoeConfig, GptOssConfig

    return {"deepseek_v3": DeepseekV3Config, "glm4_moe": Glm4MoeConfig,
            "gpt_oss": GptOssConfig}[family]


def family_config(family: str, **overrides):
    """A tiny HF config of ``family`` (eager experts); keyword arguments override fields."""
    fields = {**_COMMON, **FAMILY_CONFIG[family], **overrides}
    fields.pop("head_dim", None) if family == "deepseek_v3" else None
    config = _config_class(family)(**fields)
    config._experts_implementation = "eager"
    return config


@torch.no_grad()
def _redraw_extras(model, seed: int) -> None:
    """Parameters transformers starts at zero (or tiny) that a test must see matter."""
    g = torch.Generator().manual_seed(10_000 + seed)
    rn = lambda t, s: t.copy_(torch.randn(t.shape, generator=g) * s)  # noqa: E731
    for name, p in sorted(list(model.named_parameters()) + list(model.named_buffers())):
        if name.endswith("e_score_correction_bias"):
            rn(p, 0.15)
        elif name.endswith(("gate_up_proj_bias", "down_proj_bias")):
            rn(p, 0.3)
        elif name.endswith("self_attn.sinks"):
            rn(p, 1.0)
        elif name.endswith("router.bias"):
            rn(p, 0.5)


def make_family_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                      **overrides):
    """A randomly initialized ``*ForCausalLM`` of ``family`` in eval mode (deterministic)."""
    from transformers import AutoModelForCausalLM

    config = family_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _redraw_extras(model, seed)
    return model.eval()


# What each adapter kind targets (PEFT names). "full": attention, shared experts, the dense MLP
# of layer 0, the router and the routed experts; "experts": the routed experts only.
ATTENTION = {"deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                             "o_proj"],
             "glm4_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "gpt_oss": ["q_proj", "k_proj", "v_proj", "o_proj"]}
SHARED = ["shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj",
          "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
ROUTER = {"deepseek_v3": "mlp.gate.weight", "glm4_moe": "mlp.gate.weight",
          "gpt_oss": "mlp.router.weight"}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def adapter_targets(family: str, kind: str) -> tuple[list[str], list[str]]:
    """``(target_modules, target_parameters)`` of adapter ``kind`` ("full" | "experts")."""
    if kind == "experts":
        return [], list(EXPERTS)
    modules = list(ATTENTION[family]) + (SHARED if family != "gpt_oss" else [])
    return modules, [ROUTER[family], *EXPERTS]


def make_family_adapter(model, family: str, kind: str, out_dir: str | os.PathLike | None, *,
                        r: int, alpha: float, use_rslora: bool = False, seed: int = 0,
                        b_std: float = 0.2):
    """A real PEFT LoRA of ``kind`` on ``model`` with every factor redrawn, saved to
    ``out_dir``; returns the ``PeftModel``.

    PEFT 0.21 rewrites every ``target_modules`` entry ending in ``gate_proj`` / ``up_proj`` /
    ``down_proj`` into the routed experts' fused parameters for the model types it converts
    from transformers 4 (DeepSeek-V3 and GLM-4.5 among them), so the shared experts and the
    dense MLP cannot be targeted by name. The conversion is keyed on ``config.model_type``:
    it is hidden while PEFT wraps the model, which gives the plain ``nn.Linear`` LoRA a
    transformers-4 training run (or another trainer) writes, with PEFT's own keys
    (``mlp.shared_experts.gate_proj.lora_A.weight``).
    """
    from peft import LoraConfig, get_peft_model

    modules, params = adapter_targets(family, kind)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules,
                        target_parameters=params, use_rslora=use_rslora, bias="none")
    model_type = model.config.model_type
    model.config.model_type = f"{model_type}_unconverted"
    try:
        peft_model = get_peft_model(model, config)
    finally:
        model.config.model_type = model_type
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
    peft_model.eval()
    if out_dir is not None:
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return peft_model


def save_family_model(model, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out
