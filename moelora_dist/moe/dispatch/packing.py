"""What the all-to-all dispatchers share: token shares, the byte-row format, collectives.

Legend: T tokens, H hidden, K top-k, P EP degree, R rows, W int32 meta words per row.

A token travels as one byte row, so a single ``all_to_all_single`` moves everything::

    [ fp32 topk weights (K) | int32 local expert ids (K) | int32 adapter slot | pad | x (H) | pad ]

Offsets and the row stride are multiples of 16 bytes, so every part views in place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelora_dist.parallel.groups import group_size

# torch >= 2.13 renamed all_gather_into_tensor; the GPU machine runs 2.11.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def share_bounds(num_tokens: int, ep: int, ep_rank: int) -> tuple[int, int]:
    """Token range ``[start, end)`` of EP rank ``ep_rank``'s share of ``ceil(T / ep)`` tokens
    (may be empty when ``T < ep``)."""
    chunk = -(-num_tokens // ep)
    start = min(num_tokens, ep_rank * chunk)
    return start, min(num_tokens, start + chunk)


def all_gather_into(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``out = cat(inp of every rank of group)`` (one tensor, rank order)."""
    _all_gather_single(out, inp, group=group)


def all_gather_shares(y_nH: torch.Tensor, num_tokens: int, group) -> torch.Tensor:
    """Concatenate every EP rank's share (padded to one chunk) back into ``[T, H]``."""
    ep = group_size(group)
    if ep == 1:
        return y_nH
    chunk = -(-num_tokens // ep)
    padded = y_nH.new_zeros(chunk, y_nH.shape[1])
    padded[: y_nH.shape[0]] = y_nH
    out = y_nH.new_empty(ep * chunk, y_nH.shape[1])
    all_gather_into(out, padded, group)
    return out[:num_tokens]


def all_to_all_rows(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
                    in_splits: list[int] | None, group) -> None:
    """``all_to_all_single`` over ``group`` (a copy on a group of one); None splits: even."""
    if group_size(group) == 1:
        out.copy_(inp)
        return
    dist.all_to_all_single(out, inp, output_split_sizes=out_splits,
                           input_split_sizes=in_splits, group=group)


def row_layout(hidden: int, top_k: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(offset of x, row bytes)`` of the byte-row format (module docstring)."""
    meta = 4 * top_k + 4 * (top_k + 1)
    x_off = -(-meta // 16) * 16
    xb = hidden * dtype.itemsize
    return x_off, x_off + -(-xb // 16) * 16


def meta_words(top_k: int) -> int:
    """int32 words of the meta part of a row, padding included (a multiple of 4)."""
    return row_layout(1, top_k, torch.uint8)[0] // 4


def meta_row(weights: torch.Tensor, local_ids: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """int32 meta words ``[..., W]`` from fp32 weights ``[..., K]``, int32 local ids
    ``[..., K]`` and int32 slots ``[..., 1]`` (leading dims broadcast)."""
    K = local_ids.shape[-1]
    lead = torch.broadcast_shapes(weights.shape[:-1], local_ids.shape[:-1], slot.shape[:-1])
    parts = [weights.to(torch.float32).contiguous().view(torch.int32).expand(*lead, K),
             local_ids.to(torch.int32).expand(*lead, K), slot.to(torch.int32).expand(*lead, 1)]
    pad = meta_words(K) - (2 * K + 1)
    if pad:
        parts.append(torch.zeros(1, dtype=torch.int32, device=local_ids.device).expand(*lead, pad))
    return torch.cat(parts, dim=-1)


def pack_rows(meta_RW: torch.Tensor, x_RH: torch.Tensor) -> torch.Tensor:
    """Byte rows ``meta | x | pad`` ``[R, row bytes]`` from meta words and tokens."""
    parts = [meta_RW.view(torch.uint8), x_RH.contiguous().view(torch.uint8)]
    tail = meta_RW.shape[1] * 4 + x_RH.shape[1] * x_RH.element_size()
    tail = -(-tail // 16) * 16 - tail
    if tail:
        parts.append(torch.zeros(x_RH.shape[0], tail, dtype=torch.uint8, device=x_RH.device))
    return torch.cat(parts, dim=1)


def unpack_rows(rows: torch.Tensor, hidden: int, top_k: int, dtype: torch.dtype):
    """Views into byte rows: ``x [R, H]``, ``weights [R, K]`` fp32, ``ids [R, K]`` int32,
    ``slot [R]`` int32 (strided views: the expert kernels get contiguous copies)."""
    x_off, _ = row_layout(hidden, top_k, dtype)
    xb = hidden * dtype.itemsize
    w = rows[:, :4 * top_k].view(torch.float32)
    meta = rows[:, 4 * top_k:4 * (2 * top_k + 1)].view(torch.int32)
    x = rows[:, x_off:x_off + xb].view(dtype)
    return x, w, meta[:, :top_k], meta[:, top_k]
