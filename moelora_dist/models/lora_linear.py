"""Multi-LoRA on the dense linear layers (attention q/k/v/o, dense MLPs), per token.

Legend: T tokens, S slots, R max rank, I input features (rank-local), O output features
(rank-local). The pool stores ``a [S, R, I]`` and ``b [S, O, R]`` with the LoRA scaling folded
into ``b``; ``token_slot_T`` says which slot each token uses (``-1``: none).

Why all slots at once: ``x @ A_all^T`` over the ``S*R`` stacked rows, masked to each token's own
slot, then one GEMM with the stacked ``B``. No gather of per-token weight copies and no
data-dependent shapes or host syncs, so decode stays sync-free; the price is computing ``S*R``
shrink columns where ``R`` would do, which is small next to the base GEMM while ``S*R`` is a few
hundred. The shrink result stays in fp32 up to the expand (bf16 shrink results have produced
garbage generations in a peer engine).

Tensor-parallel use: for a column-parallel layer ``b`` holds this rank's output rows; for a
row-parallel layer ``a`` holds this rank's input columns, so the shrink is a partial sum over
TP and the delta rides on the same all-reduce as the base output.
"""

from __future__ import annotations

import torch


def lora_delta(x_TI: torch.Tensor, a_SRI: torch.Tensor, b_SOR: torch.Tensor,
               token_slot_T: torch.Tensor) -> torch.Tensor:
    """Per-token LoRA delta ``b[slot_t] @ (a[slot_t] @ x_t)``; zero where ``slot_t == -1``.

    Args:
        x_TI: ``[T, I]`` activations (any float dtype).
        a_SRI: ``[S, R, I]`` LoRA A of every slot.
        b_SOR: ``[S, O, R]`` LoRA B of every slot, scaling folded in.
        token_slot_T: ``[T]`` int slot per token, ``-1`` = no adapter.
    Returns:
        ``[T, O]`` float32 delta (callers add it to the base output, then cast).
    """
    S, R, I = a_SRI.shape
    T = x_TI.shape[0]
    if x_TI.shape[1] != I or b_SOR.shape[0] != S or b_SOR.shape[2] != R:
        raise ValueError(
            f"LoRA shapes do not match: x {tuple(x_TI.shape)}, a {tuple(a_SRI.shape)}, "
            f"b {tuple(b_SOR.shape)}")
    shrink_TSR = (x_TI.float() @ a_SRI.reshape(S * R, I).float().T).view(T, S, R)
    # One-hot of the token's slot; -1 matches no slot, so base-only tokens get exactly zero.
    own_TS = token_slot_T.long()[:, None] == torch.arange(S, device=x_TI.device)[None, :]
    shrink_TSR = shrink_TSR * own_TS[:, :, None].to(shrink_TSR.dtype)
    b_KO = b_SOR.float().permute(0, 2, 1).reshape(S * R, -1)
    return shrink_TSR.view(T, S * R) @ b_KO


def lora_delta_reference(x_TI: torch.Tensor, a_SRI: torch.Tensor, b_SOR: torch.Tensor,
                         token_slot_T: torch.Tensor) -> torch.Tensor:
    """Token-by-token loop with the same contract as :func:`lora_delta` (tests only)."""
    out = torch.zeros(x_TI.shape[0], b_SOR.shape[1], dtype=torch.float32, device=x_TI.device)
    for t, s in enumerate(token_slot_T.tolist()):
        if s >= 0:
            out[t] = b_SOR[s].double() @ (a_SRI[s].double() @ x_TI[t].double())
    return out


def linear_with_lora(x_TI: torch.Tensor, w_OI: torch.Tensor, bias_O: torch.Tensor | None,
                     lora, token_slot_T: torch.Tensor | None,
                     out_rows: slice | None = None) -> torch.Tensor:
    """``x @ w^T (+ bias) + LoRA delta`` in ``x``'s dtype.

    Args:
        x_TI: ``[T, I]``; w_OI: ``[O, I]`` rank-local base weight; bias_O: ``[O]`` or None.
        lora: the pool's ``DenseLoRABuffers`` of this module (``a [S,R,I]``, ``b [S,O',R]``),
            or None when no token of the batch uses an adapter.
        token_slot_T: ``[T]`` int, or None with ``lora`` None.
        out_rows: rows of ``lora.b`` to use when the pool keeps the module replicated but this
            rank computes only some of its outputs (kv heads replicated over TP ranks).
    Returns:
        ``[T, O]`` in ``x_TI.dtype``.
    """
    y_TO = torch.nn.functional.linear(x_TI, w_OI, bias_O)
    if lora is None:
        return y_TO
    b = lora.b if out_rows is None else lora.b[:, out_rows]
    return (y_TO.float() + lora_delta(x_TI, lora.a, b, token_slot_T)).to(x_TI.dtype)
