"""Bytes of a checkpoint's weights as the runtime holds them on one process, from its config
alone (what ``inspect-adapter --model-config`` prints): FP8 modules as e4m3 values + fp32
128x128 block scales, everything else in the activation dtype; and the KV bytes per token."""

from __future__ import annotations

from moelora_dist.config.model import ModelConfig
from moelora_dist.config.quant import FP8_BLOCK


def _linear(cfg: ModelConfig, module: str, n: int, k: int, elem: int) -> tuple[int, bool]:
    if cfg.fp8 is not None and not cfg.fp8.dequantize and cfg.fp8.converts(module):
        return n * k + (-(-n // FP8_BLOCK)) * (-(-k // FP8_BLOCK)) * 4, True
    return n * k * elem, False


def weight_bytes(cfg: ModelConfig, elem: int = 2) -> dict[str, int]:
    """``{"fp8": bytes of FP8 modules incl. scales, "other": the rest, "kv_per_token": ...}``."""
    H, D, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    out = {"fp8": 0, "other": V * H * elem + H * elem}
    if not cfg.tie_word_embeddings:
        b, q = _linear(cfg, "lm_head", V, H, elem)
        out["fp8" if q else "other"] += b
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        mods = [(f"{p}.self_attn.q_proj", cfg.num_heads * D, H),
                (f"{p}.self_attn.k_proj", cfg.num_kv_heads * D, H),
                (f"{p}.self_attn.v_proj", cfg.num_kv_heads * D, H),
                (f"{p}.self_attn.o_proj", H, cfg.num_heads * D)]
        if cfg.is_moe_layer(i):
            out["other"] += cfg.num_experts * H * elem  # the router stays unquantized
            e = f"{p}.{cfg.moe_prefix}.experts"
            I = cfg.moe_intermediate
            mods += [(e, 2 * I, H)] * cfg.num_experts + [(e, H, I)] * cfg.num_experts
        else:
            F_ = cfg.dense_intermediate
            mods += [(f"{p}.mlp.gate_proj", F_, H), (f"{p}.mlp.up_proj", F_, H),
                     (f"{p}.mlp.down_proj", H, F_)]
        for name, n, k in mods:
            b, q = _linear(cfg, name, n, k, elem)
            out["fp8" if q else "other"] += b
        out["other"] += 2 * H * elem  # the two norms
        qk = {"head": 2 * D, "full": (cfg.num_heads + cfg.num_kv_heads) * D}.get(cfg.qk_norm, 0)
        bias = (cfg.num_heads + 2 * cfg.num_kv_heads) * D if cfg.attention_bias else 0
        out["other"] += (qk + bias) * elem
    out["kv_per_token"] = 2 * cfg.num_layers * cfg.num_kv_heads * D * elem
    return out
