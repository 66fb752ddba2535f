"""Triton kernel: gate_up with the LoRA shrink inside its K loop (``MoEConfig.fuse_shrink``).

Imports triton only. One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``h`` for one
expert block, as ``kernel_gate_up.py`` does, and takes the LoRA shrink ``x A^T`` from the same
``x`` tiles it loads for the base GEMM: the A factors of the block's first ``NUM_RUNS`` slot
runs are stacked on the N axis of one extra dot per K step (gate and up), so a LoRA call needs
no shrink launch, no LoRA alignment and no shrink buffer. A block with more runs takes the rest
``NUM_RUNS`` at a time in a second pass over K after the main loop (``x`` re-read). Every
n-tile program recomputes its rows' shrink: the price is A read from L2 ``I_l / BLOCK_N`` times
and ``NUM_RUNS * BR`` more columns of MMA per K step; the tuner measures whether it pays.

Isolation: the stacked dot multiplies every row by the A of every run of the chunk; each row
keeps its own run's band by a select of the ``[BLOCK_M, NUM_RUNS * BR]`` shrink result (the
other bands, non-finite for a bad slot, are dropped, never multiplied by a mask), and the
expand multiplies those exact zeros by finite-selected B tiles, as in ``kernel_gate_up.py``.
"""

import triton
import triton.language as tl

from moelora_dist.kernels.moe_gemm.kernel_common import (
    _block_rows, _down_shrink_epilogue, _finite_or_zero, _gelu_tanh_mul, _row_runs, _row_slots,
    _silu_mul, _stacked_slots, _tile_of)


@triton.jit
def _stacked_a(a_ptr, a_shared_ptr, slot_rank_ptr, slot_q, r_q, expert,
               stride_as, stride_ae, stride_ar):
    """Pointers to row ``r_q`` of the A_gate of slot ``slot_q`` (A_up is ``half_rows`` rows
    further), and the mask ``r_q < rank``; a shared A sits at expert 0 (expert stride 0)."""
    has_q = slot_q >= 0
    rank_q = tl.load(slot_rank_ptr + slot_q, mask=has_q, other=0)
    shared_q = tl.load(a_shared_ptr + slot_q, mask=has_q, other=0) != 0
    ea_q = tl.where(shared_q, 0, expert)
    ptrs = a_ptr + slot_q.to(tl.int64) * stride_as + ea_q * stride_ae + r_q * stride_ar
    return ptrs, r_q < rank_q


@triton.jit
def _own_band(acc, run_m, rank_m, first, band_q, r_q):
    """The shrink of each row's own run (columns past its rank are zero), exact 0 elsewhere."""
    own = (run_m[:, None] == first + band_q[None, :]) & (r_q[None, :] < rank_m[:, None])
    return tl.where(own, acc, 0.0)


@triton.jit
def _expand(acc_g, acc_u, s_g, s_u, b_ptr, slot_rank_ptr, slot_q, r_q, expert, offs_n,
            n_mask, inter, stride_bs, stride_be, stride_bn, stride_br):
    """``acc += s B^T`` for gate and up with the stacked B of the chunk's runs (finite tiles)."""
    rank_q = tl.load(slot_rank_ptr + slot_q, mask=slot_q >= 0, other=0)
    b_mask = (r_q < rank_q)[:, None] & n_mask[None, :]
    b_g_ptr = (b_ptr + slot_q[:, None].to(tl.int64) * stride_bs + expert * stride_be
               + offs_n[None, :] * stride_bn + r_q[:, None] * stride_br)
    b_g = _finite_or_zero(tl.load(b_g_ptr, mask=b_mask, other=0.0))
    b_u = _finite_or_zero(tl.load(b_g_ptr + inter * stride_bn, mask=b_mask, other=0.0))
    acc_g += tl.dot(s_g, b_g)
    acc_u += tl.dot(s_u, b_u)
    return acc_g, acc_u


@triton.jit(do_not_specialize=["group_m"])
def _gate_up_lora_kernel(x_ptr, w_ptr, h_ptr, sorted_ids_ptr, block_bucket_ptr,
                         num_post_pad_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                         a_shared_ptr, a_ptr, b_ptr, da_ptr, dpart_ptr,
                         num_pairs, top_k, hidden, inter, half_rows, dpart_stride,
                         stride_xt, stride_xh, stride_we, stride_wn, stride_wh,
                         stride_as, stride_ae, stride_ar, stride_ah,
                         stride_bs, stride_be, stride_bn, stride_br,
                         stride_das, stride_dae, stride_dar, stride_dai, group_m,
                         ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, NUM_RUNS: tl.constexpr,
                         FUSE_DOWN_SHRINK: tl.constexpr, DS_RUNS: tl.constexpr):
    """h[pair, n-tile] = act(x W_g^T + s_g B_g^T) * (x W_u^T + s_u B_u^T), s = x A^T here."""
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _tile_of(pid, tl.cdiv(inter, BLOCK_N), group_m)
    expert, rows, row_mask = _block_rows(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                                         pid_m, num_pairs, BLOCK_M)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    tok = rows // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    w_gate = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn
    w_up = w_gate + inter * stride_wn
    slot_m = _row_slots(tok, row_mask, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr)
    run_m, num_runs = _row_runs(sorted_ids_ptr, pid_m, slot_m, num_pairs, top_k,
                                token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, BLOCK_M)
    rank_m = tl.load(slot_rank_ptr + slot_m, mask=slot_m >= 0, other=0)
    x_rows = x_ptr + tok[:, None] * stride_xt

    # The first NUM_RUNS runs ride the main loop.
    slot_q, band_q, r_q = _stacked_slots(run_m, slot_m, 0, NUM_RUNS, BLOCK_R)
    a_g, a_ok = _stacked_a(a_ptr, a_shared_ptr, slot_rank_ptr, slot_q, r_q, expert,
                           stride_as, stride_ae, stride_ar)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_sg = tl.zeros([BLOCK_M, NUM_RUNS * BLOCK_R], dtype=tl.float32)
    acc_su = tl.zeros([BLOCK_M, NUM_RUNS * BLOCK_R], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden
        x = tl.load(x_rows + offs_k[None, :] * stride_xh,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        wg = tl.load(w_gate + offs_k[:, None] * stride_wh, mask=w_mask, other=0.0)
        wu = tl.load(w_up + offs_k[:, None] * stride_wh, mask=w_mask, other=0.0)
        acc_g += tl.dot(x, wg.to(x.dtype))
        acc_u += tl.dot(x, wu.to(x.dtype))
        a_mask = k_mask[:, None] & a_ok[None, :]
        ag = tl.load(a_g[None, :] + offs_k[:, None] * stride_ah, mask=a_mask, other=0.0)
        au = tl.load(a_g[None, :] + half_rows * stride_ar + offs_k[:, None] * stride_ah,
                     mask=a_mask, other=0.0)
        acc_sg += tl.dot(x, ag.to(x.dtype))
        acc_su += tl.dot(x, au.to(x.dtype))
    acc_g, acc_u = _expand(acc_g, acc_u, _own_band(acc_sg, run_m, rank_m, 0, band_q, r_q),
                           _own_band(acc_su, run_m, rank_m, 0, band_q, r_q), b_ptr,
                           slot_rank_ptr, slot_q, r_q, expert, offs_n, n_mask, inter,
                           stride_bs, stride_be, stride_bn, stride_br)

    # Blocks with more runs: the rest, NUM_RUNS at a time, each with its own pass over K.
    for first in tl.range(NUM_RUNS, num_runs, NUM_RUNS, num_stages=1):
        slot_c, band_c, r_c = _stacked_slots(run_m, slot_m, first, NUM_RUNS, BLOCK_R)
        a_c, a_ok_c = _stacked_a(a_ptr, a_shared_ptr, slot_rank_ptr, slot_c, r_c, expert,
                                 stride_as, stride_ae, stride_ar)
        s_g = tl.zeros([BLOCK_M, NUM_RUNS * BLOCK_R], dtype=tl.float32)
        s_u = tl.zeros([BLOCK_M, NUM_RUNS * BLOCK_R], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < hidden
            x = tl.load(x_rows + offs_k[None, :] * stride_xh,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            a_mask = k_mask[:, None] & a_ok_c[None, :]
            ag = tl.load(a_c[None, :] + offs_k[:, None] * stride_ah, mask=a_mask, other=0.0)
            au = tl.load(a_c[None, :] + half_rows * stride_ar + offs_k[:, None] * stride_ah,
                         mask=a_mask, other=0.0)
            s_g += tl.dot(x, ag.to(x.dtype))
            s_u += tl.dot(x, au.to(x.dtype))
        acc_g, acc_u = _expand(acc_g, acc_u, _own_band(s_g, run_m, rank_m, first, band_c, r_c),
                               _own_band(s_u, run_m, rank_m, first, band_c, r_c), b_ptr,
                               slot_rank_ptr, slot_c, r_c, expert, offs_n, n_mask, inter,
                               stride_bs, stride_be, stride_bn, stride_br)

    if ACT == 0:
        h = _silu_mul(acc_g, acc_u)
    else:
        h = _gelu_tanh_mul(acc_g, acc_u)
    h = h.to(h_ptr.dtype.element_ty)
    if FUSE_DOWN_SHRINK:
        _down_shrink_epilogue(h, rows, slot_m, run_m, num_runs, expert, offs_n, n_mask, pid_n,
                              da_ptr, slot_rank_ptr, dpart_ptr, dpart_stride,
                              stride_das, stride_dae, stride_dar, stride_dai,
                              BLOCK_M, BLOCK_R, DS_RUNS)
    tl.store(h_ptr + rows[:, None] * inter + offs_n[None, :], h,
             mask=row_mask[:, None] & n_mask[None, :])
