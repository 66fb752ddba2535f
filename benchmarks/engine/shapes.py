"""The model shapes and random adapters of the engine benchmarks. No engine import, so the
launch counter also runs on older trees: Qwen3-30B-A3B's shape and its tiny twin come from
:mod:`moelora_dist.config.shapes` (one file with no imports, which such a tree needs a copy
of); gpt-oss-20b's shape lives here."""

from __future__ import annotations

import torch

from moelora_dist.config.shapes import QWEN3_30B_A3B, TINY

# Qwen3-30B-A3B-FP8's quantization_config (the Hugging Face fine-grained FP8 layout): e4m3
# weights with one fp32 scale per 128x128 block, activations quantized per token and 128
# columns at run time; lm_head (and the routers, embeddings and norms, which are no FP8
# modules here) stay bf16.
FP8_QUANTIZATION = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                        weight_block_size=[128, 128], modules_to_not_convert=["lm_head"])

# gpt-oss-20b's config.json (24 layers alternating sliding-128 / full attention, sinks,
# biases, 32 experts top-4 with the clamped SwiGLU, YaRN x32), bf16 experts (no MXFP4).
GPT_OSS_20B = dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880,
                   intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                   num_key_value_heads=8, head_dim=64, num_local_experts=32,
                   num_experts_per_tok=4, sliding_window=128,
                   layer_types=["sliding_attention", "full_attention"] * 12,
                   attention_bias=True, swiglu_limit=7.0, rms_norm_eps=1e-5,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                    "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                    "original_max_position_embeddings": 4096},
                   max_position_embeddings=131072, eos_token_id=None)
TINY_GPT_OSS = dict(GPT_OSS_20B, vocab_size=256, hidden_size=64, intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"],
                    max_position_embeddings=4096)
# --model name -> (full shape, tiny shape, the ``model`` column of each)
MODELS = {"qwen3-30b-a3b": ((QWEN3_30B_A3B, "qwen3-30b-a3b-shape"), (TINY, "tiny")),
          "gpt-oss-20b": ((GPT_OSS_20B, "gpt-oss-20b-shape"), (TINY_GPT_OSS, "tiny-gpt-oss"))}


def random_adapter(name, cfg, rank, device, seed, host: bool = False):
    """Rank-``rank`` LoRA on q/k/v/o and on every expert projection of every layer (bf16),
    drawn on ``device`` (``host``: then kept in host memory)."""
    from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA

    g = torch.Generator(device=device).manual_seed(seed)
    to = "cpu" if host else device

    def rn(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16).to(to)

    E, H, I, D = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate, cfg.head_dim
    f = lambda o, i, e=1: LoRAFactors(rn(e, rank, i), rn(e, o, rank), 2.0)  # noqa: E731
    dense, moe = {}, {}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}.self_attn"
        dense[f"{p}.q_proj"] = f(cfg.num_heads * D, H)
        dense[f"{p}.k_proj"] = f(cfg.num_kv_heads * D, H)
        dense[f"{p}.v_proj"] = f(cfg.num_kv_heads * D, H)
        dense[f"{p}.o_proj"] = f(H, cfg.num_heads * D)
        moe[layer] = MoELayerLoRA(E, f(I, H, E), f(I, H, E), f(H, I, E))
    return CanonicalAdapter(name, moe=moe, dense=dense, format="random")
