"""Small configs of the three families (no transformers needed) and a random adapter on every
module a model's pool serves: shared by the layout tests (tests/multi_gpu) and the GPU tests.

Each config turns on its family's variants: MLA with YaRN (mscale != mscale_all_dim) and
2 shared experts (DeepSeek-V3), grouped sigmoid routing, q/k norm and biases (GLM-4.5),
sinks, windows, biases and the clamp at ``swiglu_limit = 1`` (gpt-oss).
"""

from __future__ import annotations

import torch

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA
from moelora_dist.config.model import ModelConfig
from moelora_dist.models.attention import HeadSplit
from moelora_dist.models.model import dense_module_specs

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              rms_norm_eps=1e-6, max_position_embeddings=256, eos_token_id=None)
RAW = {
    "deepseek_v3": dict(COMMON, model_type="deepseek_v3", n_routed_experts=8,
                        num_experts_per_tok=3, moe_intermediate_size=24, intermediate_size=48,
                        n_shared_experts=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=12,
                        qk_rope_head_dim=8, v_head_dim=10, num_key_value_heads=4,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                         "original_max_position_embeddings": 64,
                                         "mscale": 1.0, "mscale_all_dim": 0.707}),
    "glm4_moe": dict(COMMON, model_type="glm4_moe", n_routed_experts=8, num_experts_per_tok=3,
                     moe_intermediate_size=24, intermediate_size=48, n_shared_experts=1,
                     n_group=2, topk_group=1, first_k_dense_replace=1, num_key_value_heads=2,
                     head_dim=8, attention_bias=True, use_qk_norm=True),
    "gpt_oss": dict(COMMON, model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2,
                    intermediate_size=24, num_key_value_heads=2, head_dim=8, sliding_window=4,
                    swiglu_limit=1.0,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0,
                                     "truncate": False, "original_max_position_embeddings": 32}),
}


def family_adapter(cfg: ModelConfig, name: str, rank: int, seed: int, std: float = 0.3,
                   device="cpu") -> CanonicalAdapter:
    """Every dense module the pool serves (MLA projections or q/k/v/o, shared experts, dense
    MLPs, the router) and every expert projection, random."""
    g = torch.Generator(device=device).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device=device) * std  # noqa: E731
    f = lambda o, i, e=1: LoRAFactors(rn(e, rank, i), rn(e, o, rank), 0.5)  # noqa: E731
    dense = {p: f(s.out_dim, s.in_dim)
             for p, s in dense_module_specs(cfg, HeadSplit.for_rank(cfg, 1, 0)).items()}
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate
    moe = {layer: MoELayerLoRA(E, f(I, H, E), f(I, H, E), f(H, I, E)) for layer in cfg.moe_layers}
    return CanonicalAdapter(name, moe=moe, dense=dense)
