"""Token-by-token references that tests hold the fast paths against."""

from __future__ import annotations

import torch


def dense_lora_token_loop(x_TI: torch.Tensor, a_SRI: torch.Tensor, b_SOR: torch.Tensor,
                          token_slot_T: torch.Tensor) -> torch.Tensor:
    """fp64 loop over tokens: ``b[slot_t] @ (a[slot_t] @ x_t)``, zero for ``slot_t == -1``.

    Args: x_TI ``[T, I]``, a_SRI ``[S, R, I]``, b_SOR ``[S, O, R]`` (scaling folded in),
    token_slot_T ``[T]``. Returns ``[T, O]`` fp32.
    """
    out = torch.zeros(x_TI.shape[0], b_SOR.shape[1], dtype=torch.float32, device=x_TI.device)
    for t, s in enumerate(token_slot_T.tolist()):
        if s >= 0:
            out[t] = b_SOR[s].double() @ (a_SRI[s].double() @ x_TI[t].double())
    return out
