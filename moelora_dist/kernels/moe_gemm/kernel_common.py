"""Triton helpers shared by the grouped-GEMM kernels (imports triton only)."""

import triton
import triton.language as tl

NO_SLOT = tl.constexpr(2147483647)  # larger than any slot; ends the loop over the slots of a block


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
    return tl.min(tl.where(slot_m > after, slot_m, 2147483647), axis=0)


@triton.jit
def _silu_mul(gate, up):
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.jit
def _gelu_tanh_mul(gate, up):
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
    th = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
    return 0.5 * gate * (1.0 + th) * up
