"""Top-k and top-p as one raw-logit threshold per row (PyTorch; both backends use it).

    row_max_B, tau_B = filter_thresholds(logits_BV, temperature_B, top_k_B, top_p_B, width)

Every filter keeps the tokens whose logit is at or above a per-row threshold, so the sampling
kernel never needs the sorted order: it compares each logit with ``tau_B``. Order (that of
Hugging Face ``generate``'s warpers): temperature, then top-k, then top-p on the top-k
survivors renormalized, then min-p (``naive.keep_threshold``, in the kernel).

``width`` is decided on the host from the batch's parameters, never from device data:
``0`` no row has top-k or top-p (no sort; only the row max is read), ``0 < width < V`` only
top-k rows with ``k <= width`` (``torch.topk`` of ``width``), ``width == V`` some row has top-p
(a full sort: top-p's cut can lie anywhere in the vocabulary). Ties at a cut are all kept
(a sort's order among equal logits is arbitrary; keeping them all makes the result
independent of it). No host sync, static shapes: CUDA-graph safe.

Legend: B rows, V vocabulary, W width of the sorted prefix.
"""

from __future__ import annotations

import torch


def filter_thresholds(logits_BV: torch.Tensor, temperature_B: torch.Tensor,
                      top_k_B: torch.Tensor, top_p_B: torch.Tensor, width: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(row_max_B, tau_B)``: the row's largest logit (logits' dtype) and the top-k / top-p
    threshold on raw logits (fp32; ``-inf`` where the row sets neither), or None for
    ``width == 0``.

    ``logits_BV`` any float dtype; ``temperature_B`` fp32 (rows with ``T == 0`` are greedy:
    their threshold is never read); ``top_k_B`` int64 (``0`` = off; clamped to ``width``);
    ``top_p_B`` fp32 in ``(0, 1]`` (``1`` = off; read only when ``width == V``).
    """
    B, V = logits_BV.shape
    if width <= 0:
        return logits_BV.amax(-1), None
    width = min(int(width), V)
    if width == V:
        vals_BW = torch.sort(logits_BV, dim=-1, descending=True).values.float()
    else:
        vals_BW = torch.topk(logits_BV, width, dim=-1, sorted=True).values.float()
    row_max = vals_BW[:, 0]
    k = top_k_B.long()
    kth = vals_BW.gather(1, (k.clamp(1, width) - 1)[:, None]).squeeze(1)
    tau_k = torch.where(k > 0, kth, float("-inf"))
    if width < V:
        return row_max, tau_k
    return row_max, torch.maximum(tau_k, _top_p_threshold(vals_BW, temperature_B, tau_k, top_p_B))


def _top_p_threshold(vals_BV: torch.Tensor, temperature_B: torch.Tensor, tau_k_B: torch.Tensor,
                     top_p_B: torch.Tensor) -> torch.Tensor:
    """Smallest logit of the shortest prefix of ``vals_BV`` (sorted descending, fp32) whose
    mass under ``softmax(l / T)`` over the top-k survivors reaches ``top_p`` (``-inf`` where
    ``top_p >= 1``). A sorted position is kept when the mass strictly before it is below
    ``top_p`` of the total (Hugging Face's ``cumsum_ascending > 1 - top_p``)."""
    t = temperature_B.float()
    t = torch.where(t > 0, t, 1.0)[:, None]  # greedy rows: any finite scale, never read
    e_BV = torch.exp((vals_BV - vals_BV[:, :1]) / t)
    e_BV = torch.where(vals_BV >= tau_k_B[:, None], e_BV, 0.0)
    cum_BV = torch.cumsum(e_BV, dim=-1)
    # The total is the scan's last entry, not a separate sum: positions past the top-k cut
    # then compare exactly equal to it and are never kept.
    total = cum_BV[:, -1:]
    p = top_p_B.float()[:, None]
    count = ((cum_BV - e_BV) < p * total).sum(-1, keepdim=True)  # >= 1: position 0 has 0 before
    tau_p = vals_BV.gather(1, count - 1).squeeze(1)
    return torch.where(top_p_B.float() < 1, tau_p, float("-inf"))
