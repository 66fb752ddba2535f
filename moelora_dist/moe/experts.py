"""Local-expert computation with multi-LoRA: the kernel family's reference or its Triton path.

The backend is chosen once, when a layer is built (:func:`pick_backend`): Triton for CUDA
weights, the PyTorch reference (:mod:`moelora_dist.kernels.moe_lora.naive`) otherwise.
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.kernels.weights import MoELoRAWeights

BACKENDS = ("torch", "triton")


def pick_backend(device: torch.device, backend: str | None = None) -> str:
    """``backend`` if given (checked), else ``triton`` on CUDA and ``torch`` elsewhere."""
    choice = backend or ("triton" if device.type == "cuda" else "torch")
    if choice not in BACKENDS:
        raise ValueError(f"unknown expert backend {choice!r}; pick one of {BACKENDS}")
    return choice


def run_experts(backend: str, x_NH: torch.Tensor, w_gate_up_EXH: torch.Tensor,
                w_down_EHI: torch.Tensor, topk_weights_NK: torch.Tensor,
                topk_ids_NK: torch.Tensor, token_slot_N: torch.Tensor | None,
                lora: MoELoRAWeights | None, activation,
                slot_enabled_S: torch.Tensor | None,
                num_lora_tokens: int | None, b_gate_up_EX: torch.Tensor | None = None,
                b_down_EH: torch.Tensor | None = None, *,
                max_lora_rank: int | None = None, sum_pairs: bool = True) -> torch.Tensor:
    """``[N, H]`` weighted expert outputs of the routed rows (shapes as in
    :func:`~moelora_dist.kernels.moe_lora.naive.experts_reference`); ``lora=None`` or
    ``token_slot_N=None`` runs the base path only. ``activation``: a name or an
    ``Activation``; the biases: gpt-oss's (``b_down_EH`` on one MoE-TP rank only).
    ``max_lora_rank``: the batch's largest adapter rank when known on the host (the Triton
    path's rank tiles follow it). ``sum_pairs=False``: the Triton path returns its pair
    outputs before the top-k sum (``moe_gemm.ops.PairOutputs``, for a consumer that sums them
    itself); the reference returns the sum whatever it says."""
    if x_NH.shape[0] == 0:
        return x_NH.new_zeros(0, x_NH.shape[1])
    if token_slot_N is None:
        lora = None
    if backend == "torch":
        return experts_reference(x_NH, w_gate_up_EXH, w_down_EHI, topk_weights_NK,
                                 topk_ids_NK, token_slot_N, lora, activation, b_gate_up_EX,
                                 b_down_EH)
    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora  # Triton: optional off x86 Linux

    return fused_moe_lora(x_NH, w_gate_up_EXH, w_down_EHI, topk_weights_NK, topk_ids_NK,
                          token_slot_N, lora, activation, slot_enabled_S,
                          num_lora_tokens=num_lora_tokens, max_lora_rank=max_lora_rank,
                          b_gate_up_EX=b_gate_up_EX, b_down_EH=b_down_EH,
                          sum_pairs=sum_pairs)
