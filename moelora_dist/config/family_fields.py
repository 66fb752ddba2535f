"""The family-specific fields of :class:`~moelora_dist.config.model.ModelConfig`, strictly
read (a missing required field or a value the runner cannot serve is a
:class:`~moelora_dist.config.model.ModelConfigError` naming it). The table of what each field
means is in :mod:`.families`.
"""

from __future__ import annotations

from moelora_dist.config.families import (FIRST_K_DENSE_DEFAULT, GROUPED_ROUTER, mla_dims_of,
                                          moe_layer_indices, shared_intermediate_of)
from moelora_dist.config.rope import RopeConfigError, parse_rope
from moelora_dist.errors import MoeloraError


# transformers' class defaults for fields a config.json may omit.
GROUPED_DEFAULTS = {"deepseek_v3": dict(n_group=8, topk_group=4, routed_scaling_factor=2.5),
                    "glm4_moe": dict(n_group=1, topk_group=1, routed_scaling_factor=1.0)}


class FamilyConfigError(MoeloraError):
    """A family field the runner cannot serve (re-raised as ModelConfigError by the parser)."""


def _req(raw: dict, key: str):
    if raw.get(key) is None:
        raise FamilyConfigError(f"config.json lacks {key!r}")
    return raw[key]


def _rope(raw: dict, head_dim: int, **kw):
    try:
        return parse_rope(raw, head_dim, **kw)
    except RopeConfigError as exc:
        raise FamilyConfigError(str(exc)) from None


def classic_fields(family: str, raw: dict, num_layers: int, head_dim: int) -> dict:
    """Qwen3-MoE, Mixtral, OLMoE (as before this module existed)."""
    if family == "qwen3_moe":
        out = dict(moe_intermediate=int(_req(raw, "moe_intermediate_size")),
                   dense_intermediate=int(raw.get("intermediate_size") or 0),
                   moe_layers=moe_layer_indices(raw),
                   renormalize=bool(raw.get("norm_topk_prob", False)), qk_norm="head",
                   sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window")
                   else None)
    else:
        out = dict(moe_intermediate=int(_req(raw, "intermediate_size")), dense_intermediate=0,
                   moe_layers=tuple(range(num_layers)),
                   renormalize=True if family == "mixtral" else bool(
                       raw.get("norm_topk_prob", False)),
                   qk_norm="full" if family == "olmoe" else "none",
                   sliding_window=raw.get("sliding_window") if family == "mixtral" else None)
    out["rope"] = _rope(raw, head_dim)
    out["attention_bias"] = bool(raw.get("attention_bias", False))
    return out


def grouped_router_fields(family: str, raw: dict, num_layers: int, num_experts: int,
                          top_k: int, head_dim: int) -> dict:
    """DeepSeek-V3 / Kimi-K2 and GLM-4.5: dense first layers, shared experts, the sigmoid
    router with correction bias and groups; MLA (DeepSeek) or partial-rotary GQA (GLM)."""
    d = GROUPED_DEFAULTS[family]
    n_group = int(raw.get("n_group") or d["n_group"])
    topk_group = int(raw.get("topk_group") or d["topk_group"])
    if num_experts % n_group:
        raise FamilyConfigError(f"n_routed_experts={num_experts} is not divisible by "
                                f"n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        raise FamilyConfigError(f"topk_group={topk_group} must lie in [1, n_group={n_group}]")
    if top_k > topk_group * (num_experts // n_group):
        raise FamilyConfigError(f"num_experts_per_tok={top_k} exceeds the experts of the "
                                f"{topk_group} kept group(s) ({num_experts // n_group} each)")
    if num_experts // n_group < 2:
        raise FamilyConfigError("every expert group needs at least 2 experts (a group's score "
                                "is the sum of its top-2)")
    first = raw.get("first_k_dense_replace")
    first = FIRST_K_DENSE_DEFAULT[family] if first is None else int(first)
    out = dict(moe_intermediate=int(_req(raw, "moe_intermediate_size")),
               dense_intermediate=int(raw.get("intermediate_size") or 0) if first else 0,
               moe_layers=tuple(range(first, num_layers)),
               shared_intermediate=shared_intermediate_of(raw),
               router="sigmoid_grouped", n_group=n_group, topk_group=topk_group,
               routed_scaling_factor=float(raw.get("routed_scaling_factor")
                                           or d["routed_scaling_factor"]),
               renormalize=bool(raw.get("norm_topk_prob", True)), router_fp32=True,
               correction_bias=True, mtp_layers=int(raw.get("num_nextn_predict_layers") or 0))
    assert family in GROUPED_ROUTER
    bias = bool(raw.get("attention_bias", False))
    if family == "deepseek_v3":
        mla = mla_dims_of(raw)
        if mla is None:
            raise FamilyConfigError("a DeepSeek-V3 config needs kv_lora_rank, qk_nope_head_dim, "
                                    "qk_rope_head_dim and v_head_dim")
        # transformers computes the YaRN range over config.head_dim = qk_rope_head_dim.
        out.update(attention="mla", mla=mla, head_dim=mla.qk_head_dim,
                   rope=_rope(raw, mla.qk_rope_head_dim, rotary_dim=mla.qk_rope_head_dim,
                              interleave=bool(raw.get("rope_interleave", True))),
                   attention_bias=bias, o_bias=bias)
    else:
        out.update(rope=_rope(raw, head_dim, default_partial=0.5), attention_bias=bias,
                   o_bias=False, qk_norm="head" if raw.get("use_qk_norm") else "none")
    return out


def gpt_oss_fields(raw: dict, num_layers: int, head_dim: int) -> dict:
    """gpt-oss: biased, interleaved experts with the clamped SwiGLU, router with a bias,
    attention sinks, sliding windows on the ``sliding_attention`` layers, YaRN."""
    types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                       for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise FamilyConfigError(f"layer_types {types!r} must give sliding_attention or "
                                f"full_attention for each of the {num_layers} layers")
    window = raw.get("sliding_window")
    if "sliding_attention" in types and not window:
        raise FamilyConfigError("layer_types has sliding_attention layers but sliding_window "
                                "is not set")
    bias = bool(raw.get("attention_bias", True))
    return dict(moe_intermediate=int(_req(raw, "intermediate_size")), dense_intermediate=0,
                moe_layers=tuple(range(num_layers)), renormalize=False, router="topk_softmax",
                router_bias=True, expert_bias=True, expert_layout="interleaved",
                activation="swiglu_oai", swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
                swiglu_limit=float(raw.get("swiglu_limit", 7.0)), sinks=True,
                layer_windows=tuple(int(window) if t == "sliding_attention" else None
                                    for t in types),
                attention_bias=bias, o_bias=bias, norm_weight_first=True,
                rope=_rope(raw, head_dim))
