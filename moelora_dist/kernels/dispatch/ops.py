"""Host glue of the dispatch family: the Triton path of every function of :mod:`.naive`, with
the same signatures and results.

Pipeline of one dispatch + combine (the dispatcher, ``moe/dispatch/all_to_all_fixed.py``, runs
the collectives between them)::

    dispatch_index    1 launch, P programs   ids -> rows per destination (prefix counts)
    pack_main         1 launch               x, weights, local ids, slot, header -> byte rows,
                                             written in place into the exchange buffer
    (all_to_all_single of the byte rows)
    unpack_meta       1 launch               weights / ids / slots -> contiguous; x stays in
                                             the receive buffer, read by the experts in place
    (experts; all_to_all_single of their outputs back)
    combine           1 launch               sum of each token's returned copies -> [C0, H]

Four launches, no host sync, every shape fixed by ``T``, ``P`` and the capacity: a CUDA graph
captures them. ``pack_overflow`` (the overflow exchange, eager only) takes host lists.
"""

from __future__ import annotations

import torch
import triton

from moelora_dist.kernels.constants import next_power_of_2
from moelora_dist.kernels.dispatch.kernel import (_combine_kernel, _dispatch_index_kernel,
                                                  _dispatch_pack_kernel, _unpack_meta_kernel)
from moelora_dist.kernels.dispatch.wire import DispatchIndex, RowFormat


def _tiles(width: int) -> tuple[int, int]:
    """(BLOCK_M rows, BLOCK_H columns): about 8192 elements per tile (16 KB of bf16 per
    program and pass: a plain copy's size), rows of up to 1024. Untuned: the benchmark
    (``python -m benchmarks dispatch``) measures the copy against the HBM roofline."""
    block_h = max(16, min(1024, next_power_of_2(max(width, 1))))
    return max(1, min(16, 8192 // block_h)), block_h


def dispatch_index(topk_ids_nK: torch.Tensor, num_local_experts: int, num_dest: int,
                   capacity: int, overflow_capacity: int) -> DispatchIndex:
    """See :func:`moelora_dist.kernels.dispatch.naive.dispatch_index`."""
    n, K = topk_ids_nK.shape
    P, C, stride_o = num_dest, capacity, max(overflow_capacity, 1)
    # One allocation for the four outputs (host time: each allocation costs microseconds).
    ws = torch.empty(n * P + P * C + P * stride_o + P, dtype=torch.int32,
                     device=topk_ids_nK.device)
    pos = ws[:n * P].view(n, P)
    inv = ws[n * P:n * P + P * C].view(P, C)
    ovf = ws[n * P + P * C:n * P + P * C + P * stride_o].view(P, stride_o)
    counts = ws[n * P + P * C + P * stride_o:]
    # One program per destination walks the share in blocks (a serial prefix count): blocks
    # of up to 2048 tokens keep the walk at ~8 steps for a 16k-token share.
    block_n = max(16, min(2048, next_power_of_2(max(n, capacity, 1))))
    _dispatch_index_kernel[(num_dest,)](
        topk_ids_nK, topk_ids_nK.stride(0), topk_ids_nK.stride(1), n, K, num_local_experts,
        capacity, overflow_capacity, stride_o, num_dest, pos, inv, ovf, counts,
        BLOCK_N=block_n, BLOCK_K=next_power_of_2(K), num_warps=8 if block_n >= 1024 else 4)
    return DispatchIndex(pos, inv, ovf[:, :overflow_capacity], counts)


def _pack(buf_BB, fmt: RowFormat, x_nH, topk_weights_nK, topk_ids_nK, token_slot_n, inv_PR,
          counts_P, *, num_local_experts: int, capacity: int, me: int, bypass: bool,
          rows_per_dest: int, rows_P=None, off_P=None) -> None:
    P = counts_P.numel()
    if P * rows_per_dest == 0:
        return
    assert buf_BB.dtype == torch.uint8 and buf_BB.shape[1] == fmt.row_bytes
    assert x_nH.dtype == fmt.dtype and topk_weights_nK.dtype == torch.float32
    w = topk_weights_nK if topk_weights_nK.stride(1) == 1 else topk_weights_nK.contiguous()
    ids = topk_ids_nK if topk_ids_nK.stride(1) == 1 else topk_ids_nK.contiguous()
    has_slot = token_slot_n is not None
    slot = token_slot_n if has_slot else counts_P  # never read without HAS_SLOT
    words = fmt.words(buf_BB)
    xo = buf_BB.view(fmt.dtype)
    block_m, block_h = _tiles(fmt.x_columns)
    listed = rows_P is not None
    _dispatch_pack_kernel[(triton.cdiv(P * rows_per_dest, block_m),)](
        x_nH, x_nH.stride(0), x_nH.stride(1), w, w.stride(0), ids, ids.stride(0), slot,
        inv_PR, inv_PR.stride(0), counts_P, rows_P if listed else counts_P,
        off_P if listed else counts_P, words, xo, rows_per_dest, capacity, num_local_experts,
        me, P, fmt.top_k, fmt.hidden, fmt.x_columns, fmt.meta_words, words.stride(0),
        xo.stride(0), fmt.x_offset // fmt.itemsize,
        HAS_SLOT=has_slot, LIST=listed, BYPASS=bypass or P == 1, BLOCK_M=block_m,
        BLOCK_W=next_power_of_2(fmt.meta_words), BLOCK_H=block_h,
        BLOCK_P=next_power_of_2(P))


def pack_main(buf_BB: torch.Tensor, fmt: RowFormat, x_nH: torch.Tensor,
              topk_weights_nK: torch.Tensor, topk_ids_nK: torch.Tensor,
              token_slot_n: torch.Tensor | None, index: DispatchIndex, *,
              num_local_experts: int, capacity: int, me: int, bypass: bool) -> None:
    """See :func:`moelora_dist.kernels.dispatch.naive.pack_main`."""
    _pack(buf_BB, fmt, x_nH, topk_weights_nK, topk_ids_nK, token_slot_n, index.inv_PC,
          index.counts_P, num_local_experts=num_local_experts, capacity=capacity, me=me,
          bypass=bypass, rows_per_dest=capacity)


def pack_overflow(buf_BB: torch.Tensor, fmt: RowFormat, x_nH: torch.Tensor,
                  topk_weights_nK: torch.Tensor, topk_ids_nK: torch.Tensor,
                  token_slot_n: torch.Tensor | None, index: DispatchIndex, *,
                  num_local_experts: int, capacity: int, rows_P: list[int],
                  row_off_P: list[int]) -> None:
    """See :func:`moelora_dist.kernels.dispatch.naive.pack_overflow` (eager only: the host
    lists travel as small tensors)."""
    dev = buf_BB.device
    rows = torch.tensor(rows_P, dtype=torch.int32, device=dev)
    offs = torch.tensor(row_off_P, dtype=torch.int64, device=dev)
    _pack(buf_BB, fmt, x_nH, topk_weights_nK, topk_ids_nK, token_slot_n,
          index.overflow_inv_PO, index.counts_P, num_local_experts=num_local_experts,
          capacity=capacity, me=0, bypass=False, rows_per_dest=max(rows_P, default=0),
          rows_P=rows, off_P=offs)


def unpack_meta(rows_NB: torch.Tensor, fmt: RowFormat):
    """See :func:`moelora_dist.kernels.dispatch.naive.unpack_meta`."""
    N, K = rows_NB.shape[0], fmt.top_k
    ws = torch.empty(N * (2 * K + 1), dtype=torch.int32, device=rows_NB.device)
    w = ws[:N * K].view(torch.float32).view(N, K)
    ids = ws[N * K:2 * N * K].view(N, K)
    slot = ws[2 * N * K:]
    if N:
        words = fmt.words(rows_NB)
        _unpack_meta_kernel[(triton.cdiv(N, 64),)](
            words, words.stride(0), N, K, w, ids, slot, BLOCK_M=64,
            BLOCK_K=next_power_of_2(K))
    return w, ids, slot


def combine(out_CH: torch.Tensor, pos_nP: torch.Tensor, y_NH: torch.Tensor,
            back_BH: torch.Tensor | None, back_overflow_OH: torch.Tensor | None,
            overflow_off_P: list[int] | None, *, capacity: int, me: int,
            bypass: bool) -> torch.Tensor:
    """See :func:`moelora_dist.kernels.dispatch.naive.combine`."""
    C0, H = out_CH.shape
    n, P = pos_nP.shape
    if C0 == 0:
        return out_CH
    assert y_NH.stride(1) == 1 and out_CH.stride(1) == 1
    back = back_BH if back_BH is not None else y_NH
    has_ovf = back_overflow_OH is not None
    ovf = back_overflow_OH if has_ovf else y_NH
    offs = (torch.tensor(overflow_off_P, dtype=torch.int64, device=out_CH.device) if has_ovf
            else pos_nP)
    block_m, block_h = _tiles(H)
    _combine_kernel[(triton.cdiv(C0, block_m),)](
        out_CH, out_CH.stride(0), pos_nP, n, C0, P, capacity, me, y_NH, y_NH.stride(0),
        back, back.stride(0), ovf, ovf.stride(0), offs, H, BYPASS=bypass or P == 1,
        HAS_OVF=has_ovf, ACC_F64=out_CH.dtype == torch.float64, BLOCK_M=block_m,
        BLOCK_H=block_h, num_warps=8)  # an fp32 accumulator tile of 8192: 32 per thread
    return out_CH
