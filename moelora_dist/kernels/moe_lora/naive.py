"""Plain-PyTorch reference of one MoE layer's local experts with multi-LoRA (also the CPU
path), readable as the math in ``docs/design.md``.

Legend: T tokens, H hidden, E_l local experts, I_l local intermediate, K top-k, S slots,
R max rank. This is the ground truth every fast path is tested against; it favours clarity
over speed (a loop over experts, the rows of one slot at a time, products row by row). It
computes in float32, or float64 when ``x`` is float64, and returns ``x.dtype``.

Expert variants: biases (gpt-oss) are added to ``gate_up`` before the activation and to
``down`` before the top-k weight; under MoE-TP the caller passes ``b_down`` on one rank of the
group only (it is added once to the partial sums, not once per shard). The activation may be
gpt-oss's clamped SwiGLU (:func:`moelora_dist.kernels.activations.glu`); the LoRA deltas are
added before it, so the clamp sees the adapted product, as PEFT's parametrization does.

Sentinels: ``topk_ids == -1`` (expert not on this rank, or padding) contributes nothing;
``token_slot == -1`` (base model only) gets no LoRA delta. Neither is ever used as an index.
Isolation: a slot's factors only ever multiply the rows of that slot (rows are selected, never
masked by a multiplication), so no slot's values can reach another slot's or a base row.

FP8 experts (``w_gate_up`` / ``w_down`` given as
:class:`~moelora_dist.kernels.weights_fp8.BlockFP8Weight`): the base products use the
dequantized weights and the activations as the kernels quantize them (per token and 128
columns, e4m3: :func:`moelora_dist.kernels.block_fp8.naive.fake_quant_act`; ``h`` rounded to
``x``'s dtype first, as the kernels store it); the LoRA shrinks read the unquantized ``x`` and
``h``. The LoRA path is the same as for bf16 experts.
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.activations import glu
from moelora_dist.kernels.block_fp8.naive import dequantize, fake_quant_act
from moelora_dist.kernels.constants import Activation, check_activation
from moelora_dist.kernels.weights import MoELoRAWeights
from moelora_dist.kernels.weights_fp8 import is_fp8


def _rowwise(x_nK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """``x @ w^T`` computed row by row (a batch of ``[1, K] @ [K, N]`` products).

    A plain GEMM's bits per row depend on how many rows it has (BLAS takes other paths for
    small M), so which tokens route to an expert would change the other tokens' outputs; row
    by row, a token's result depends on nothing but its own row. That keeps a request's
    output bit-identical whatever else is in the batch (the isolation tests check it) and
    whatever layout splits the experts.
    """
    n = x_nK.shape[0]
    return torch.bmm(x_nK.unsqueeze(1), w_NK.T.unsqueeze(0).expand(n, -1, -1)).squeeze(1)


def _lora_slot_view(lora: MoELoRAWeights, slot: int, expert: int, compute_dtype):
    """The four factors of one (slot, expert), shared-outer ones read at expert 0."""
    ea = 0 if bool(lora.gate_up_a_shared[slot]) else expert
    eb = 0 if bool(lora.down_b_shared[slot]) else expert
    return (
        lora.gate_up_a[slot, ea].to(compute_dtype),  # [2R, H]
        lora.gate_up_b[slot, expert].to(compute_dtype),  # [2I_l, R]
        lora.down_a[slot, expert].to(compute_dtype),  # [R, I_l]
        lora.down_b[slot, eb].to(compute_dtype),  # [H, R]
    )


def experts_reference(
    x_TH: torch.Tensor,
    w_gate_up_EXH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    token_slot_T: torch.Tensor | None = None,
    lora: MoELoRAWeights | None = None,
    activation: "str | Activation" = "silu",
    b_gate_up_EX: torch.Tensor | None = None,
    b_down_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local experts with per-token LoRA, weighted by top-k; partial over MoE-TP shards.

    Args:
        x_TH: ``[T, H]`` tokens.
        w_gate_up_EXH: ``[E_l, 2*I_l, H]`` base gate rows then up rows (a tensor, or a
            ``BlockFP8Weight`` for FP8 experts; then ``w_down_EHI`` is one too).
        w_down_EHI: ``[E_l, H, I_l]`` base down projection.
        topk_weights_TK: ``[T, K]`` fp32 routing weights.
        topk_ids_TK: ``[T, K]`` int32 local expert ids, ``-1`` = skip.
        token_slot_T: ``[T]`` int32 adapter slot per token, ``-1`` = no adapter.
        lora: the layer's pool buffers (scaling folded into B), or None for base only.
        activation: a name or an :class:`~moelora_dist.kernels.constants.Activation`.
        b_gate_up_EX: ``[E_l, 2*I_l]`` gate then up bias rows, or None.
        b_down_EH: ``[E_l, H]`` down bias, or None (None on all but one rank of a MoE-TP
            group: the bias is added once).
    Returns:
        ``[T, H]`` in ``x_TH.dtype``: sum over k of weight * expert output (with LoRA delta).
    """
    check_activation(activation)
    compute = torch.float64 if x_TH.dtype == torch.float64 else torch.float32
    T, H = x_TH.shape
    num_local, two_i, _ = w_gate_up_EXH.shape
    i_local = two_i // 2
    x = x_TH.to(compute)
    fp8 = is_fp8(w_gate_up_EXH)
    assert fp8 == is_fp8(w_down_EHI), "gate_up and down are both FP8 or neither"
    if fp8:  # base products: quantized activations x dequantized weights
        w_gate_up_EXH, w_down_EHI = dequantize(w_gate_up_EXH, compute), dequantize(w_down_EHI,
                                                                                   compute)
        x_base = fake_quant_act(x_TH, compute)
    else:
        x_base = x
    y_TH = torch.zeros(T, H, dtype=compute, device=x_TH.device)
    if token_slot_T is None:
        token_slot_T = torch.full((T,), -1, dtype=torch.int32, device=x_TH.device)
    R = lora.max_rank if lora is not None else 0
    for e in range(num_local):
        hit_TK = topk_ids_TK == e
        tokens = hit_TK.any(dim=1).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        weight_t = torch.where(hit_TK, topk_weights_TK.to(compute), 0).sum(dim=1)[tokens]
        xe = x[tokens]  # [n, H]
        gate_up = _rowwise(x_base[tokens], w_gate_up_EXH[e].to(compute))  # [n, 2I_l]
        if b_gate_up_EX is not None:
            gate_up = gate_up + b_gate_up_EX[e].to(compute)
        slots = token_slot_T[tokens]
        slot_rows = {s: (slots == s).nonzero().flatten() for s in torch.unique(slots).tolist()
                     if s >= 0} if lora is not None else {}
        for s, rows in slot_rows.items():
            a_gu, b_gu, _, _ = _lora_slot_view(lora, s, e, compute)
            shrink = _rowwise(xe[rows], a_gu)  # [m, 2R]
            gate_up[rows] += torch.cat([_rowwise(shrink[:, :R], b_gu[:i_local]),
                                        _rowwise(shrink[:, R:], b_gu[i_local:])], dim=1)
        h = glu(activation, gate_up[:, :i_local], gate_up[:, i_local:])  # [n, I_l]
        h_base = fake_quant_act(h.to(x_TH.dtype), compute) if fp8 else h
        out = _rowwise(h_base, w_down_EHI[e].to(compute))  # [n, H]
        if b_down_EH is not None:
            out = out + b_down_EH[e].to(compute)
        for s, rows in slot_rows.items():
            _, _, a_d, b_d = _lora_slot_view(lora, s, e, compute)
            out[rows] += _rowwise(_rowwise(h[rows], a_d), b_d)
        y_TH.index_add_(0, tokens, weight_t[:, None] * out)
    return y_TH.to(x_TH.dtype)
