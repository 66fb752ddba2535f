"""Local-expert computation with multi-LoRA: one entry point, two backends.

``fused_experts`` has the signature of :func:`moelora_dist.moe.reference.experts_reference`
(plus ``slot_enabled_S``) and picks the Triton kernels for CUDA tensors and the reference for
CPU tensors. ``MOELORA_BACKEND=torch`` or ``=triton`` forces one, for debugging.
"""

from __future__ import annotations

import os

import torch

from moelora_dist.lora.buffers import MoELoRABuffers
from moelora_dist.moe.reference import experts_reference

BACKENDS = ("torch", "triton")


def pick_backend(device: torch.device, backend: str | None = None) -> str:
    """``backend`` argument, else ``MOELORA_BACKEND``, else triton on CUDA / torch on CPU."""
    choice = backend or os.environ.get("MOELORA_BACKEND") or (
        "triton" if device.type == "cuda" else "torch")
    if choice not in BACKENDS:
        raise ValueError(f"unknown backend {choice!r}; MOELORA_BACKEND must be one of {BACKENDS}")
    return choice


def fused_experts(
    x_TH: torch.Tensor,
    w_gate_up_EXH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    token_slot_T: torch.Tensor | None = None,
    lora: MoELoRABuffers | None = None,
    activation: str = "silu",
    slot_enabled_S: torch.Tensor | None = None,
    backend: str | None = None,
    num_lora_tokens: int | None = None,
) -> torch.Tensor:
    """See :func:`experts_reference` for shapes; ``lora=None`` runs the base path only.

    ``num_lora_tokens``: the host-side count of ``BatchInfo`` when known. It spares the Triton
    path its host check of ``slot_enabled_S.any()`` (a sync per layer otherwise).
    """
    if pick_backend(x_TH.device, backend) == "torch":
        return experts_reference(x_TH, w_gate_up_EXH, w_down_EHI, topk_weights_TK,
                                 topk_ids_TK, token_slot_T, lora, activation)
    from moelora_dist.kernels.fused_moe_lora import fused_moe_lora  # imports triton lazily

    return fused_moe_lora(x_TH, w_gate_up_EXH, w_down_EHI, topk_weights_TK, topk_ids_TK,
                          token_slot_T, lora, activation, slot_enabled_S,
                          num_lora_tokens=num_lora_tokens)
