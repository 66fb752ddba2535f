"""Triton kernel: grouped gate_up GEMM + LoRA expand + activation.

Imports triton only. One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``h`` for one
expert block: ``gate`` and ``up`` tiles from the base weights, then the LoRA expand
``shrink B^T`` of the block's slots, added BEFORE the activation, then ``h = act(gate) * up``.
The down projection's LoRA shrink ``h A_down^T`` runs after, from the stored ``h``
(``kernel_shrink.py``), or, with ``FUSE_DOWN_SHRINK``, here on the ``h`` tile in registers: one
fp32 partial per n-tile, summed by the down expand. The gate_up shrink may come in
``num_sparts`` partial buffers (an H-split shrink); the expand adds them in order. ``W_FP8``:
the base weights are e4m3 with block scales and ``x`` is quantized per token and 128 columns
in the K loop, or arrives quantized (``X_FP8``: e4m3 ``x`` and its ``[T, ceil(H / 128)]``
scales); the LoRA expand is unchanged (its shrink read the unquantized ``x``);
``WS_PER_TILE``: the tile's weight rows share one scale row, loaded as a scalar. Expert
variants as constexpr flags: ``HAS_BIAS`` adds a per-expert bias before the activation
(gpt-oss), ``ACT == 2`` is gpt-oss's clamped SwiGLU (``act_alpha``, ``act_limit``); the LoRA
delta is in the accumulators by then, so the clamp sees the adapted product.

Isolation (one slot's factors never reach another slot's rows or a base row): a row's shrink
values are loaded as exact zeros outside its own slot (its own run's band), and the factor
tiles are selected finite (``_finite_or_zero``), so every product a row gets from another
slot is ``0 * finite = 0``. Selecting on the factor tile ([BLOCK_R, BLOCK_N]) rather than on
the dot's result keeps ``acc += dot`` accumulating in place: a select of the result needed a
second [BLOCK_M, BLOCK_N] accumulator, which spilled at 128x128 tiles and doubled the time
of a LoRA call at T = 4096 (H200, measured).
"""

import triton
import triton.language as tl

from moelora_dist.kernels.block_fp8.kernel import _quant_act_tile
from moelora_dist.kernels.moe_gemm.kernel_common import (
    NO_SLOT, _block_rows, _down_shrink_epilogue, _finite_or_zero, _fp8_step, _gelu_tanh_mul,
    _load_parts, _next_slot, _row_runs, _row_slots, _silu_mul, _stacked_slots, _swiglu_oai_mul,
    _tile_of, _w_scale_row)


@triton.jit(do_not_specialize=["group_m"])
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                    token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, a_shared_ptr,
                    shrink_ptr, b_ptr, da_ptr, dpart_ptr, bias_ptr,
                    num_pairs, top_k, hidden, inter, num_sparts, spart_stride, dpart_stride,
                    stride_xt, stride_xh, stride_we, stride_wn, stride_wh,
                    stride_bs, stride_be, stride_bn, stride_br,
                    stride_das, stride_dae, stride_dar, stride_dai,
                    ws_ptr, scale_bn, stride_se, stride_sn, stride_sk, xs_ptr, stride_xst,
                    stride_bias_e, act_alpha, act_limit, group_m,
                    HAS_LORA: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    RUN_LOOP: tl.constexpr, NUM_RUNS: tl.constexpr,
                    FUSE_DOWN_SHRINK: tl.constexpr, DS_RUNS: tl.constexpr,
                    W_FP8: tl.constexpr, X_FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
                    WS_PER_TILE: tl.constexpr):
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
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if W_FP8:
        # FP8 experts: BLOCK_K == 128, one activation group per step (kernels/block_fp8).
        # The up rows of the rank follow its gate rows: scale row (inter + n) // scale_bn.
        s_base = ws_ptr + expert * stride_se
        sg_row = _w_scale_row(s_base, 0, pid_n * BLOCK_N, offs_n, scale_bn, stride_sn,
                              WS_PER_TILE)
        su_row = _w_scale_row(s_base, inter, pid_n * BLOCK_N, offs_n, scale_bn, stride_sn,
                              WS_PER_TILE)
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < hidden
            x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            kb = k0 // BLOCK_K
            if X_FP8:  # quantized before the launch (block_fp8.ops.quantize_act)
                xq = x
                xs = tl.load(xs_ptr + tok * stride_xst + kb, mask=row_mask, other=0.0)
            else:
                xq, xs = _quant_act_tile(x)
            w_mask = k_mask[:, None] & n_mask[None, :]
            wg = tl.load(w_gate + offs_k[:, None] * stride_wh, mask=w_mask, other=0.0)
            wu = tl.load(w_up + offs_k[:, None] * stride_wh, mask=w_mask, other=0.0)
            acc_g = _fp8_step(acc_g, tl.dot(xq, wg), xs, sg_row, kb, stride_sk, n_mask,
                              WS_PER_TILE)
            acc_u = _fp8_step(acc_u, tl.dot(xq, wu), xs, su_row, kb, stride_sk, n_mask,
                              WS_PER_TILE)
    else:
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < hidden
            x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & n_mask[None, :]
            wg = tl.load(w_gate + offs_k[:, None] * stride_wh, mask=w_mask, other=0.0)
            wu = tl.load(w_up + offs_k[:, None] * stride_wh, mask=w_mask, other=0.0)
            acc_g += tl.dot(x, wg.to(x.dtype))
            acc_u += tl.dot(x, wu.to(x.dtype))

    if HAS_LORA:
        slot_m = _row_slots(tok, row_mask, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr)
        offs_r = tl.arange(0, BLOCK_R)
        if RUN_LOOP:
            run_m, num_runs = _row_runs(sorted_ids_ptr, pid_m, slot_m, num_pairs, top_k,
                                        token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                                        BLOCK_M)
            has_m = slot_m >= 0
            rank_m = tl.load(slot_rank_ptr + slot_m, mask=has_m, other=0)
            # Shared-A slots computed their shrink once per token, at row num_pairs + token.
            shared_m = tl.load(a_shared_ptr + slot_m, mask=has_m, other=0) != 0
            src = tl.where(shared_m, num_pairs + tok, rows)
            # A loop over the block's slot runs whose addresses depend on the run index only
            # (the slot loop below finds each next slot by a reduction over the block first);
            # NUM_RUNS runs share one dot. num_stages=1: software-pipelining this loop
            # multi-buffers its tiles next to the main loop's (out of shared memory at 128x128
            # tiles on H100, slower at rank 64 on H200).
            for first in tl.range(0, num_runs, NUM_RUNS, num_stages=1):
                slot_q, band_q, r_q = _stacked_slots(run_m, slot_m, first, NUM_RUNS, BLOCK_R)
                s_mask = ((run_m[:, None] == first + band_q[None, :])
                          & (r_q[None, :] < rank_m[:, None]))
                s_ptr = shrink_ptr + src[:, None] * (2 * BLOCK_R) + r_q[None, :]
                s_g = _load_parts(s_ptr, s_mask, num_sparts, spart_stride)
                s_u = _load_parts(s_ptr + BLOCK_R, s_mask, num_sparts, spart_stride)
                rank_q = tl.load(slot_rank_ptr + slot_q, mask=slot_q >= 0, other=0)
                b_mask = (r_q < rank_q)[:, None] & n_mask[None, :]
                b_g_ptr = (b_ptr + slot_q[:, None].to(tl.int64) * stride_bs
                           + expert * stride_be + offs_n[None, :] * stride_bn
                           + r_q[:, None] * stride_br)
                b_g = _finite_or_zero(tl.load(b_g_ptr, mask=b_mask, other=0.0))
                b_u = _finite_or_zero(tl.load(b_g_ptr + inter * stride_bn, mask=b_mask,
                                              other=0.0))
                acc_g += tl.dot(s_g, b_g)
                acc_u += tl.dot(s_u, b_u)
        else:
            # One slot at a time, the next one found by a reduction over the block: measured
            # faster than the run loop at 128x128 tiles, slower at 16x64 (docs/kernels.md).
            slot = _next_slot(slot_m, -1)
            while slot != NO_SLOT:
                sel = slot_m == slot
                slot64 = slot.to(tl.int64)
                r_mask = offs_r < tl.load(slot_rank_ptr + slot64)
                # Shared-A slots computed their shrink once per token, at row num_pairs + tok.
                shared = tl.load(a_shared_ptr + slot64) != 0
                src = tl.where(shared, num_pairs + tok, rows)
                s_ptr = shrink_ptr + src[:, None] * (2 * BLOCK_R) + offs_r[None, :]
                s_mask = sel[:, None] & r_mask[None, :]
                s_g = _load_parts(s_ptr, s_mask, num_sparts, spart_stride)
                s_u = _load_parts(s_ptr + BLOCK_R, s_mask, num_sparts, spart_stride)
                b_base = b_ptr + slot64 * stride_bs + expert * stride_be
                b_off = offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br
                b_mask = r_mask[:, None] & n_mask[None, :]
                b_g = _finite_or_zero(tl.load(b_base + b_off, mask=b_mask, other=0.0))
                b_u = _finite_or_zero(tl.load(b_base + inter * stride_bn + b_off, mask=b_mask,
                                              other=0.0))
                acc_g += tl.dot(s_g, b_g)
                acc_u += tl.dot(s_u, b_u)
                slot = _next_slot(slot_m, slot)

    if HAS_BIAS:  # gpt-oss: [E_l, 2 I_l] bias rows, gate then up (unit stride)
        bias_row = bias_ptr + expert * stride_bias_e + offs_n
        acc_g += tl.load(bias_row, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(bias_row + inter, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACT == 0:
        h = _silu_mul(acc_g, acc_u)
    elif ACT == 1:
        h = _gelu_tanh_mul(acc_g, acc_u)
    else:
        h = _swiglu_oai_mul(acc_g, acc_u, act_alpha, act_limit)
    h = h.to(h_ptr.dtype.element_ty)
    if HAS_LORA:
        if FUSE_DOWN_SHRINK:
            ds_slot = _row_slots(tok, row_mask, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr)
            ds_run, ds_num = _row_runs(sorted_ids_ptr, pid_m, ds_slot, num_pairs, top_k,
                                       token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, BLOCK_M)
            _down_shrink_epilogue(h, rows, ds_slot, ds_run, ds_num, expert, offs_n, n_mask,
                                  pid_n, da_ptr, slot_rank_ptr, dpart_ptr, dpart_stride,
                                  stride_das, stride_dae, stride_dar, stride_dai,
                                  BLOCK_M, BLOCK_R, DS_RUNS)
    out_mask = row_mask[:, None] & n_mask[None, :]
    tl.store(h_ptr + rows[:, None] * inter + offs_n[None, :], h, mask=out_mask)
