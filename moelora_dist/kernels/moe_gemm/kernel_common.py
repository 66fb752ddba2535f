"""Triton helpers shared by the grouped-GEMM kernels (imports triton only)."""

import triton
import triton.language as tl

from moelora_dist.kernels import constants

NO_SLOT = tl.constexpr(constants.NO_SLOT)  # larger than any slot; ends the loop over a block's slots
FLOAT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _block_rows(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr, pid_m, num_items,
                BLOCK_M: tl.constexpr):
    """Bucket, item ids and row mask of block ``pid_m``; bucket -1 means "skip"."""
    num_post_pad = tl.load(num_post_pad_ptr)
    bucket = tl.load(block_bucket_ptr + pid_m)
    bucket = tl.where(pid_m * BLOCK_M < num_post_pad, bucket, -1)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_ids_ptr + offs).to(tl.int64)
    return bucket, rows, rows < num_items


@triton.jit
def _tile_of(pid, num_n, group_m):
    """``(pid_m, pid_n)`` of program ``pid`` of a grid of ``num_m * num_n`` tiles (``num_m``
    row blocks, ``num_n`` column tiles), in groups of ``group_m`` row blocks: inside a group the
    row block varies fastest, so the blocks of one expert that read the same weight tile run
    side by side and the second read of it comes from L2. ``group_m = 1`` is row-block-major
    (each block sweeps all its columns before the next starts: an expert with more rows than
    one block reads its weights from HBM once per block); larger groups also keep the rows of
    a group's activations in L2 while its columns are swept (GEMM tile swizzling)."""
    num_m = tl.num_programs(0) // num_n
    in_group = group_m * num_n
    first_m = (pid // in_group) * group_m
    size_m = tl.minimum(num_m - first_m, group_m)
    local = pid % in_group
    return first_m + local % size_m, local // size_m


@triton.jit
def _row_slots(tok, row_mask, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr):
    """Effective slot of each row: its token's slot if enabled with rank > 0, else -1."""
    slot = tl.load(token_slot_ptr + tok, mask=row_mask, other=-1)
    ok = row_mask & (slot >= 0)
    en = tl.load(slot_enabled_ptr + slot, mask=ok, other=0)
    rk = tl.load(slot_rank_ptr + slot, mask=ok, other=0)
    return tl.where(ok & (en != 0) & (rk > 0), slot, -1)


@triton.jit
def _next_slot(slot_m, after):
    """Smallest slot in the block above ``after`` (NO_SLOT when none): rows are sorted by slot
    inside an expert, so a block usually holds one or two slots and this loop runs that often."""
    return tl.min(tl.where(slot_m > after, slot_m, NO_SLOT), axis=0)


@triton.jit
def _finite_or_zero(t):
    """``t`` in fp32 with every NaN / +-Inf replaced by 0 (NaN fails the comparison).

    Isolation: a stacked LoRA dot multiplies every row's zeros by the factors of the other
    slots in its K bands; selecting finite factors keeps ``0 * factor == 0`` exact, so no slot
    (loaded around the load-time checks) can carry a NaN into another slot's or a base row.
    """
    t = t.to(tl.float32)
    return tl.where(tl.abs(t) <= FLOAT_MAX, t, 0.0)


@triton.jit
def _silu_mul(gate, up):
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.jit
def _swiglu_oai_mul(gate, up, alpha, limit):
    """gpt-oss: ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate,
    limit)`` (transformers' ``GptOssExperts._apply_gate``)."""
    g = tl.minimum(gate, limit)
    u = tl.minimum(tl.maximum(up, -limit), limit)
    return (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))


@triton.jit
def _gelu_tanh_mul(gate, up):
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
    th = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
    return 0.5 * gate * (1.0 + th) * up


@triton.jit
def _row_runs(sorted_ids_ptr, pid_m, slot_m, num_items, top_k, token_slot_ptr,
              slot_enabled_ptr, slot_rank_ptr, BLOCK_M: tl.constexpr):
    """Run index of each row (-1 for rows without a slot) and the number of runs.

    A run is a stretch of consecutive rows with the same slot. Rows of an expert are sorted by
    slot, so a block holds few runs; the expand then stacks the factors of several runs into
    one dot. Nothing depends on the sort for correctness: a slot split over two runs is just
    two bands of the stacked dot. The previous row's slot is read back from ``sorted_ids``.
    """
    offs = tl.arange(0, BLOCK_M)
    prev = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + offs - 1, mask=offs > 0,
                   other=num_items).to(tl.int64)
    prev_mask = prev < num_items
    prev_slot = _row_slots(prev // top_k, prev_mask, token_slot_ptr, slot_enabled_ptr,
                           slot_rank_ptr)
    starts = (slot_m >= 0) & ((offs == 0) | (slot_m != prev_slot))
    run_m = tl.cumsum(starts.to(tl.int32), axis=0) - 1
    return tl.where(slot_m >= 0, run_m, -1), tl.sum(starts.to(tl.int32), axis=0)


@triton.jit
def _stacked_slots(run_m, slot_m, first_run, NUM_RUNS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Slot of each row of the stacked K axis (``NUM_RUNS * BLOCK_R`` rows: band j holds run
    ``first_run + j``), -1 where the run does not exist; and the band's rank index."""
    offs_j = tl.arange(0, NUM_RUNS)
    hit = run_m[:, None] == (first_run + offs_j)[None, :]
    slot_j = tl.max(tl.where(hit, slot_m[:, None], -1), axis=0)
    slot_q = tl.reshape(tl.broadcast_to(slot_j[:, None], (NUM_RUNS, BLOCK_R)),
                        (NUM_RUNS * BLOCK_R,))
    offs_q = tl.arange(0, NUM_RUNS * BLOCK_R)
    return slot_q, offs_q // BLOCK_R, offs_q % BLOCK_R


@triton.jit
def _load_parts(ptrs, mask, num_parts, part_stride):
    """Sum of ``num_parts`` fp32 partial buffers read at the same offsets (``part_stride``
    elements apart), in a fixed order: a split shrink stays deterministic, so a graph replay
    equals the eager call bit for bit."""
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for _ in range(1, num_parts):
        ptrs += part_stride  # pointer arithmetic is 64-bit: no int32 overflow of p * stride
        acc += tl.load(ptrs, mask=mask, other=0.0)
    return acc


@triton.jit
def _down_shrink_epilogue(h, rows, slot_m, run_m, num_runs, expert, offs_n, n_mask, pid_n,
                          da_ptr, slot_rank_ptr, dpart_ptr, dpart_stride,
                          stride_das, stride_dae, stride_dar, stride_dai,
                          BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                          NUM_RUNS: tl.constexpr):
    """This n-tile's share of the down LoRA shrink, from the ``h`` tile still in registers:
    ``dpart[pid_n, row, :BR] = h[row, tile] A_down[slot(row), expert][:, tile]^T``.

    ``h``: ``[BLOCK_M, BLOCK_N]`` in the dtype ``h`` is stored in (the down shrink kernel reads
    the stored ``h``; the same rounding keeps the two paths equal up to summation order).
    ``NUM_RUNS`` slot runs share one dot; each row keeps its own run's band by a select (the
    other bands hold products with other slots' factors and are dropped, never multiplied).
    Rows without a slot are not written; the down expand never reads them.
    """
    offs_r = tl.arange(0, BLOCK_R)
    offs_j = tl.arange(0, NUM_RUNS)
    for first in tl.range(0, num_runs, NUM_RUNS, num_stages=1):
        slot_q, band_q, r_q = _stacked_slots(run_m, slot_m, first, NUM_RUNS, BLOCK_R)
        rank_q = tl.load(slot_rank_ptr + slot_q, mask=slot_q >= 0, other=0)
        a = tl.load(da_ptr + slot_q[None, :].to(tl.int64) * stride_das + expert * stride_dae
                    + r_q[None, :] * stride_dar + offs_n[:, None] * stride_dai,
                    mask=n_mask[:, None] & (r_q < rank_q)[None, :], other=0.0)
        acc = tl.dot(h, a.to(h.dtype))
        acc3 = tl.reshape(acc, (BLOCK_M, NUM_RUNS, BLOCK_R))
        own = (run_m - first)[:, None, None] == offs_j[None, :, None]
        part = tl.sum(tl.where(own, acc3, 0.0), axis=1)
        in_chunk = (run_m >= first) & (run_m < first + NUM_RUNS)
        tl.store(dpart_ptr + pid_n * dpart_stride + rows[:, None] * BLOCK_R + offs_r[None, :],
                 part, mask=in_chunk[:, None])


@triton.jit
def _w_scale_row(base, first_row, tile_start, offs_n, scale_bn, stride_sn,
                 PER_TILE: tl.constexpr):
    """Pointer(s) to the FP8 weight-scale row of an n-tile (columns ``offs_n``, the first at
    ``tile_start``) of the weight rows that start at ``first_row``: one scalar pointer when the
    tile's rows share one scale row (``PER_TILE``, the launcher's check), else one per column."""
    if PER_TILE:
        row = base + ((first_row + tile_start) // scale_bn) * stride_sn
    else:
        row = base + ((first_row + offs_n) // scale_bn) * stride_sn
    return row


@triton.jit
def _fp8_step(acc, dot, xs, s_row, kb, stride_sk, n_mask, PER_TILE: tl.constexpr):
    """``acc + dot * xs[row] * w_scale[col]`` for K step ``kb`` (the same fp32 products in both
    forms). ``PER_TILE``: one scalar scale load per step and the scale folded per row; the
    per-column form holds a [BLOCK_N] scale vector (one load per column, repeated in every
    thread that holds the column) that took 254 registers against 176 at 64x128 tiles, 8 warps
    (``python -m benchmarks.kernels.ir_report``)."""
    if PER_TILE:
        acc += dot * (xs * tl.load(s_row + kb * stride_sk))[:, None]
    else:
        ws = tl.load(s_row + kb * stride_sk, mask=n_mask, other=0.0)
        acc += dot * (xs[:, None] * ws[None, :])
    return acc
