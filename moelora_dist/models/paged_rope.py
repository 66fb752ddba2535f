"""Rotary embeddings the fused page write does not compute, applied in PyTorch before it.

Legend: T tokens, N heads, D head dim, R rotated dims, Pmax positions.

The paged-attention family's ``rope_write`` rotates the whole head by halves from the model's
``[Pmax, D/2]`` tables. Two families rotate otherwise: GLM-4.5 only the first ``R`` dims
(partial rotary) and DeepSeek-V3's MLA interleaved pairs of its rope part. For them the
rotation runs here (:func:`~moelora_dist.models.rope.apply_rotary`, transformers' op order and
casts: the ``[T, R]`` tables are taken in the model dtype), and ``rope_write`` then only
stores: its tables are one row of cos = 1, sin = 0 read at position 0 for every token (an
exact identity in fp32), so the page write, its slots and its graph-safety are the kernel's.
"""

from __future__ import annotations

import torch

from moelora_dist.models.rope import apply_rotary

_IDENTITY: dict = {}  # (half dim, device) -> (cos [1, D/2] ones, sin [1, D/2] zeros) fp32


def per_token_tables(rope: tuple[torch.Tensor, torch.Tensor], positions_T: torch.Tensor,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[T, R]`` in ``dtype`` from the model's ``[Pmax, R/2]`` fp32 tables."""
    cos, sin = rope
    return (torch.cat((cos, cos), dim=-1)[positions_T].to(dtype),
            torch.cat((sin, sin), dim=-1)[positions_T].to(dtype))


def identity_tables(half: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[1, half]`` fp32 ones / zeros: a rotation ``rope_write`` leaves exact."""
    key = (half, str(device))
    if key not in _IDENTITY:  # made before any capture (the first, uncaptured step)
        _IDENTITY[key] = (torch.ones(1, half, device=device),
                          torch.zeros(1, half, device=device))
    return _IDENTITY[key]


def rotate_then_write(kern, q_TND: torch.Tensor, k_TND: torch.Tensor, v_TND: torch.Tensor,
                      batch, rope, k_pages: torch.Tensor, v_pages: torch.Tensor,
                      interleave: bool = False) -> torch.Tensor:
    """Rotate the first ``R`` dims of q and k (``rope``: the model's ``[Pmax, R/2]`` tables),
    store k and v into their page slots with ``kern.rope_write`` as an identity rotation, and
    return the rotated ``[T, N_q, D]`` queries."""
    cos_TR, sin_TR = per_token_tables(rope, batch.positions_T, q_TND.dtype)
    q_TND = apply_rotary(q_TND, cos_TR, sin_TR, interleave).contiguous()
    k_TND = apply_rotary(k_TND, cos_TR, sin_TR, interleave).contiguous()
    one, zero = identity_tables(q_TND.shape[-1] // 2, q_TND.device)
    return kern.rope_write(q_TND, k_TND, v_TND, torch.zeros_like(batch.positions_T), one, zero,
                           batch.slot_mapping_T, k_pages, v_pages)
