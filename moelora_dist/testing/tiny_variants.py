"""The family variants of the tiny sweep model: which layer routes and computes how.

Legend: E experts, H hidden, I intermediate.

Layer ``l`` of :class:`~moelora_dist.testing.tiny.TinyMoEConfig` (with ``variants`` on) is

- ``classic`` (``l % 4`` in 0, 2): softmax top-k, SiLU experts (Qwen3-MoE / Mixtral / OLMoE);
- ``grouped`` (``l % 4 == 1``): DeepSeek-V3 / GLM-4.5 routing: sigmoid scores, a correction
  bias that only chooses, 2 expert groups of which 1 is kept, a scaling factor of 1.5, the
  router in fp32;
- ``oss`` (``l % 4 == 3``): gpt-oss: a router bias, top-k then softmax; experts stored
  ``[E, H, 2I]`` with gate/up interleaved and biases, the clamped SwiGLU at ``limit = 1``
  (which engages at these activations; 7 would not).

So a stack of 4 layers (the sweep's default) runs every router and expert variant through
every layout and dispatcher, next to every key layout of the classic layers.
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.constants import Activation
from moelora_dist.moe.router import RouterSpec

LAYER_VARIANTS = ("classic", "grouped", "classic", "oss")
SWIGLU_LIMIT = 1.0


def variant_of(cfg, layer: int) -> str:
    return LAYER_VARIANTS[layer % len(LAYER_VARIANTS)] if cfg.variants else "classic"


def num_groups(cfg) -> int:
    """2 groups when every group still holds ``top_k`` experts (and at least 2), else 1."""
    E = cfg.num_experts
    return 2 if E % 2 == 0 and E // 2 >= max(2, cfg.top_k) else 1


def router_spec(cfg, layer: int) -> RouterSpec:
    v = variant_of(cfg, layer)
    if v == "grouped":
        return RouterSpec(cfg.top_k, "sigmoid_grouped", True, num_groups(cfg), 1, 1.5)
    if v == "oss":
        return RouterSpec(cfg.top_k, "topk_softmax")
    return RouterSpec(cfg.top_k, "softmax", cfg.renormalize)


def activation(cfg, layer: int):
    if variant_of(cfg, layer) == "oss":
        return Activation("swiglu_oai", 1.702, SWIGLU_LIMIT)
    return cfg.activation


def draw_extras(cfg, layer: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The variant's extra tensors, drawn after the layer's router and experts."""
    E, H, I = cfg.num_experts, cfg.hidden, cfg.intermediate
    v = variant_of(cfg, layer)
    if v == "grouped":  # sigmoid scores sit near 0.5: 0.1 changes choices
        return {"correction_bias": torch.randn(E, generator=g) * 0.1}
    if v == "oss":
        return {"router_bias": torch.randn(E, generator=g),
                "b_gate_up": torch.randn(E, 2 * I, generator=g) * 0.3,
                "b_down": torch.randn(E, H, generator=g) * 0.3}
    return {}


def oss_keys(prefix: str, router: torch.Tensor, gu_EXH: torch.Tensor, down_EHI: torch.Tensor,
             extras: dict) -> dict[str, torch.Tensor]:
    """gpt-oss checkpoint keys from canonical weights (gate rows, then up rows)."""
    def interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
        gate, up = t.chunk(2, dim=dim)
        return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)

    return {f"{prefix}.router.weight": router, f"{prefix}.router.bias": extras["router_bias"],
            f"{prefix}.experts.gate_up_proj": interleave(gu_EXH, 1).transpose(1, 2).contiguous(),
            f"{prefix}.experts.gate_up_proj_bias": interleave(extras["b_gate_up"], 1),
            f"{prefix}.experts.down_proj": down_EHI.transpose(1, 2).contiguous(),
            f"{prefix}.experts.down_proj_bias": extras["b_down"]}
