"""Per-family facts of a MoE ``config.json``: which fields hold what, read as transformers 5
reads them (``models/<family>/configuration_*.py`` and ``modeling_*.py``).

| fact | DeepSeek-V3 / Kimi-K2 | GLM-4.5 (``glm4_moe``) | gpt-oss |
| --- | --- | --- | --- |
| model_type | ``deepseek_v3`` (Kimi-K2: ``kimi_k2``) | ``glm4_moe`` | ``gpt_oss`` |
| routed experts | ``n_routed_experts``, ``moe_intermediate_size`` | same | ``num_local_experts``, ``intermediate_size`` |
| dense layers | ``l < first_k_dense_replace`` (``intermediate_size``) | same (default 1) | none |
| shared experts | ``n_shared_experts * moe_intermediate_size``, no gate | same | none |
| router | sigmoid, correction bias, ``n_group``/``topk_group``, ``routed_scaling_factor`` | same | logits + bias, top-k, softmax over k |
| attention | MLA (``q_lora_rank``, ``kv_lora_rank``, ``qk_{nope,rope}_head_dim``, ``v_head_dim``) | GQA, ``head_dim``, partial rotary (absent: 0.5), ``use_qk_norm`` | GQA, sinks, ``layer_types`` sliding windows |
| biases | ``attention_bias``: q_a, kv_a, o | ``attention_bias``: q, k, v (o never) | q, k, v, o; experts |
| RoPE | YaRN with mscale, interleaved (``rope_interleave``) | default | YaRN by default (truncate false) |
| extra layers | ``num_nextn_predict_layers`` MTP layers after the last | same | none |

DeepSeek-V3 writes ``head_dim = qk_rope_head_dim`` into its config; attention is never sized
from it (``o_proj`` reads ``num_heads * v_head_dim``). The readers here are lenient (a missing
field gives None) so the adapter loader can check a partial config; :mod:`.model` makes them
strict for the runner.
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILY_OF = {"qwen3_moe": "qwen3_moe", "mixtral": "mixtral", "olmoe": "olmoe",
             "deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3", "glm4_moe": "glm4_moe",
             "gpt_oss": "gpt_oss"}
GROUPED_ROUTER = ("deepseek_v3", "glm4_moe")  # sigmoid + correction bias + groups
FIRST_K_DENSE_DEFAULT = {"deepseek_v3": 3, "glm4_moe": 1}
# Experts stored [E, H, 2I] (x @ W) with gate/up columns interleaved, and with biases.
INTERLEAVED_EXPERTS = ("gpt_oss",)


def family_of(raw: dict) -> str | None:
    """The family a ``model_type`` belongs to (Kimi-K2 is DeepSeek-V3), or None."""
    return FAMILY_OF.get(raw.get("model_type"))


@dataclass(frozen=True)
class MLADims:
    """Multi-head latent attention sizes (DeepSeek-V3). ``q_lora_rank`` None: a plain q_proj."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def mla_dims_of(raw: dict) -> MLADims | None:
    """MLA sizes of a DeepSeek-V3 config; None for another family or a missing field."""
    if family_of(raw) != "deepseek_v3":
        return None
    need = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    if any(raw.get(k) is None for k in need):
        return None
    return MLADims(raw.get("q_lora_rank"), *(int(raw[k]) for k in need))


def num_experts_of(raw: dict) -> int | None:
    """Routed experts per MoE layer (``num_experts``, ``num_local_experts`` or
    ``n_routed_experts``), or None for a dense config."""
    value = raw.get("num_experts") or raw.get("num_local_experts") or raw.get("n_routed_experts")
    return int(value) if value else None


def moe_intermediate_of(raw: dict) -> int | None:
    """Intermediate size of one routed expert: ``moe_intermediate_size`` where the family has
    it, else ``intermediate_size`` (Mixtral, OLMoE, gpt-oss)."""
    value = raw.get("moe_intermediate_size") or raw.get("intermediate_size")
    return int(value) if value else None


def dense_intermediate_of(raw: dict) -> int | None:
    """Intermediate size of the dense MLP layers (families whose experts have their own
    ``moe_intermediate_size``), else None."""
    if raw.get("moe_intermediate_size") is None:
        return None
    value = raw.get("intermediate_size")
    return int(value) if value else None


def shared_intermediate_of(raw: dict) -> int:
    """Intermediate size of the shared experts of a MoE layer (0: none)."""
    if family_of(raw) not in GROUPED_ROUTER:
        return 0
    n, moe_i = raw.get("n_shared_experts", 1), raw.get("moe_intermediate_size")
    return int(n) * int(moe_i) if n and moe_i else 0


def moe_layer_indices(raw: dict) -> tuple[int, ...] | None:
    """Layers whose MLP is a MoE block; None when the config does not say how many layers.

    Qwen3-MoE: not in ``mlp_only_layers`` and on the ``decoder_sparse_step``; DeepSeek-V3 and
    GLM-4.5: from ``first_k_dense_replace`` on.
    """
    layers = raw.get("num_hidden_layers")
    if layers is None or not num_experts_of(raw):
        return None
    family = family_of(raw)
    if family in FIRST_K_DENSE_DEFAULT:
        first = raw.get("first_k_dense_replace")
        first = FIRST_K_DENSE_DEFAULT[family] if first is None else int(first)
        return tuple(range(first, int(layers)))
    only = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step") or 1)
    return tuple(i for i in range(int(layers)) if i not in only and (i + 1) % step == 0)


def attention_dims(raw: dict) -> tuple[int | None, int | None, int | None]:
    """``(num_heads, num_kv_heads, head_dim)`` of GQA attention; None where absent."""
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    kv = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or (hidden // heads if hidden and heads else None)
    return heads, kv, head_dim


def router_module_of(raw: dict) -> str:
    """The router's module name inside a MoE block (gpt-oss: ``router``, else ``gate``)."""
    return "router" if family_of(raw) == "gpt_oss" else "gate"


def _mul(*xs):
    out = 1
    for x in xs:
        if x is None:
            return None
        out *= int(x)
    return out


def attention_linear_shapes(raw: dict) -> dict[str, tuple[int | None, int | None]]:
    """``{module: (in, out)}`` of one attention layer's linears, by family (None: unknown)."""
    H, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    mla = mla_dims_of(raw)
    if family_of(raw) == "deepseek_v3":
        if mla is None:
            return {}
        qk = _mul(heads, mla.qk_head_dim)
        out = {"self_attn.kv_a_proj_with_mqa": (H, mla.kv_lora_rank + mla.qk_rope_head_dim),
               "self_attn.kv_b_proj": (mla.kv_lora_rank,
                                       _mul(heads, mla.qk_nope_head_dim + mla.v_head_dim)),
               "self_attn.o_proj": (_mul(heads, mla.v_head_dim), H)}
        if mla.q_lora_rank is None:
            out["self_attn.q_proj"] = (H, qk)
        else:
            out["self_attn.q_a_proj"] = (H, int(mla.q_lora_rank))
            out["self_attn.q_b_proj"] = (int(mla.q_lora_rank), qk)
        return out
    heads, kv, head_dim = attention_dims(raw)
    q, kvo = _mul(heads, head_dim), _mul(kv, head_dim)
    return {"self_attn.q_proj": (H, q), "self_attn.k_proj": (H, kvo),
            "self_attn.v_proj": (H, kvo), "self_attn.o_proj": (q, H)}


def layer_linear_shapes(raw: dict, layer: int) -> dict[str, tuple[int | None, int | None]]:
    """Every 2-D linear of decoder layer ``layer`` a LoRA may target, ``{module: (in, out)}``
    relative to ``layers.{layer}.``: attention, the dense MLP of a dense layer, or the router
    and shared experts of a MoE layer (routed experts are not listed: they are 3-D)."""
    H = raw.get("hidden_size")
    out = attention_linear_shapes(raw)
    moe = moe_layer_indices(raw)  # None: the config cannot tell, so both kinds are listed
    if moe is None or layer in moe:
        out[f"mlp.{router_module_of(raw)}"] = (H, num_experts_of(raw))
        shared = shared_intermediate_of(raw)
        if shared:
            out.update({"mlp.shared_experts.gate_proj": (H, shared),
                        "mlp.shared_experts.up_proj": (H, shared),
                        "mlp.shared_experts.down_proj": (shared, H)})
    if moe is None or layer not in moe:
        F_ = dense_intermediate_of(raw) or raw.get("intermediate_size")
        out.update({"mlp.gate_proj": (H, F_), "mlp.up_proj": (H, F_), "mlp.down_proj": (F_, H)})
    return out
