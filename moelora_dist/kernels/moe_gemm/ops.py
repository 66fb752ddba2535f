"""Host glue of the grouped-GEMM family: launches of shrink, gate_up, down and top-k sum.

Pipeline of one layer (see :mod:`moelora_dist.kernels.moe_lora.ops`):

1. ``lora_shrink``  x A_gate/A_up^T per (slot, expert) block    -> shrink   [P, T*K + T, 2*BR] fp32
2. ``gate_up``      x W^T + shrink B^T, act(gate) * up            -> h        [T*K, I_l]
3. ``down_shrink``  h A_down^T per slot run of an expert block    -> dshrink  [P, T*K, BR] fp32
4. ``down``         w_k * (h W_down^T + dshrink B_down^T)         -> out      [T*K, H]
5. ``topk_sum``     sum over k of the valid pairs                 -> y        [T, H]

Fused variants (``MoEConfig`` switches; ``ops_fused.py`` holds the fused-shrink launcher): the
shrink split over H into ``P`` partial buffers that the gate_up expand adds; the down shrink in
the gate_up epilogue (``fuse_down_shrink``: one partial per gate_up n-tile, ``[P_d, T*K, BR]``,
added by the down expand); the gate_up shrink inside the gate_up K loop (``fuse_shrink``).

``gate_up`` and ``down`` also take FP8 base weights (a
:class:`~moelora_dist.kernels.weights_fp8.BlockFP8Weight`): the kernels then quantize their
input per token and 128 columns in the K loop (``block_k`` becomes 128), or take it quantized
beforehand (``x_scale`` / ``h_scale``: e4m3 values and their scales, the same numbers); the
LoRA stages are the same and read the unquantized activations. Every launcher takes tensors with arbitrary strides where a weight may be shared (expert
stride 0 for shared-outer factors comes from the pool's ``[S, 1, ...]`` buffers and the slot's
flag, never from an ``expand``). No launcher syncs with the host.
"""

from __future__ import annotations

import torch
import triton

from moelora_dist.kernels.align.common import Alignment
from moelora_dist.kernels.constants import FP8_GROUP, as_activation, block_r, check_activation
from moelora_dist.kernels.device import split_columns
from moelora_dist.kernels.moe_gemm.pairs import PairOutputs  # noqa: F401  (re-exported)
from moelora_dist.kernels.moe_gemm.kernel_down import _down_kernel, _topk_sum_kernel
from moelora_dist.kernels.moe_gemm.kernel_gate_up import _gate_up_kernel
from moelora_dist.kernels.moe_gemm.kernel_shrink import (
    _down_shrink_kernel, _down_shrink_runs_kernel, _lora_shrink_kernel)
from moelora_dist.kernels.weights import MoELoRAWeights
from moelora_dist.kernels.weights_fp8 import is_fp8


def _fp8_args(w, any_tensor: torch.Tensor, block_k: int):
    """``(weight tensor, (scale ptr, block_n, 3 scale strides), block_k)`` of a base weight:
    for a :class:`BlockFP8Weight` its e4m3 values and scales, with ``block_k`` set to the
    128-column activation group; for a tensor, placeholders the kernel never reads."""
    if not is_fp8(w):
        return w, (any_tensor, 1, 0, 0, 0), block_k
    s = w.scale_inv
    return w.weight, (s, w.block_n, *s.stride()), FP8_GROUP


def _scale_per_tile(w, block_n: int, first_rows: tuple[int, ...]) -> bool:
    """Whether every ``block_n``-row tile of an FP8 weight, in each row range starting at
    ``first_rows`` (gate at 0, up at ``I_l``), lies inside one scale row: the kernel then loads
    one scalar scale per K step instead of a per-column vector (same products). True when
    ``block_n`` divides the scale rows' ``block_n`` and every range starts on a tile."""
    return is_fp8(w) and w.block_n % block_n == 0 and all(r % block_n == 0 for r in first_rows)


def _check_prequant(a: torch.Tensor, scale: torch.Tensor | None, w) -> None:
    """A pre-quantized activation comes with its scales, for FP8 weights only."""
    if scale is None:
        return
    groups = triton.cdiv(a.shape[1], FP8_GROUP)
    if not is_fp8(w) or a.dtype != torch.float8_e4m3fn or tuple(scale.shape) != (
            a.shape[0], groups) or scale.dtype != torch.float32 or scale.stride(1) != 1:
        raise ValueError(f"pre-quantized activations need FP8 weights, e4m3 values and fp32 "
                         f"[{a.shape[0]}, {groups}] row-major scales; got weights "
                         f"{'FP8' if is_fp8(w) else 'not FP8'}, {a.dtype}, scales "
                         f"{scale.dtype} {tuple(scale.shape)}")


def _scale_args(scale: torch.Tensor | None, any_tensor: torch.Tensor) -> tuple:
    """(scale pointer, row stride) of a pre-quantized activation; placeholders otherwise."""
    return (scale, scale.stride(0)) if scale is not None else (any_tensor, 0)


def num_runs(lora_runs: int) -> int:
    """Check ``lora_runs`` (slot runs stacked into one LoRA dot): a power of two, >= 1."""
    if lora_runs < 1 or lora_runs & (lora_runs - 1):
        raise ValueError(f"lora_runs must be a power of two >= 1, got {lora_runs}")
    return lora_runs


def check_group_m(group_m: int) -> int:
    """Check ``group_m`` (row blocks per program group of the grouped GEMMs): an int >= 1.
    Any value computes the same result; it orders the programs (``kernel_common._tile_of``)."""
    if isinstance(group_m, bool) or not isinstance(group_m, int) or group_m < 1:
        raise ValueError(f"group_m must be an integer >= 1, got {group_m!r}")
    return group_m


def _parts(t: torch.Tensor | None) -> tuple[int, int]:
    """(number of partial buffers, elements between two) of a 2-D buffer or a 3-D stack."""
    if t is None:
        return 1, 0
    return (int(t.shape[0]), int(t[0].numel())) if t.dim() == 3 else (1, 0)


# Largest down tile (rows x columns) whose first LoRA expand tiles are loaded before the base K
# loop when the caller leaves ``prefetch`` to the launcher: decode tiles (16 x 64 .. 64 x 64),
# where the loads' latency is what the expand costs; larger tiles keep their registers for the
# loop. gate_up has no such variant: Triton 3.6 fails to compile it (TritonGPURemoveLayout-
# Conversions) at block_m 32 and 64 with the run loop, and it saved 1.9 us of 193 at T=64.
PREFETCH_MAX_TILE = 64 * 64


def _prefetch(prefetch: bool | None, block_m: int, block_n: int) -> bool:
    return block_m * block_n <= PREFETCH_MAX_TILE if prefetch is None else bool(prefetch)


def lora_shrink(x_TH: torch.Tensor, lora: MoELoRAWeights, al: Alignment, top_k: int,
                *, block_k: int = 64, num_warps: int = 4, split_k: int = 1) -> torch.Tensor:
    """Gate/up LoRA shrink for the items of a ``mode="lora"`` alignment.

    Args:
        x_TH: ``[T, H]`` fp16/bf16/fp32 tokens.
        al: alignment of ``T*K`` pairs then ``T`` tokens by ``slot * E_l + expert``.
        split_k: programs per block along H, each writing its own partial buffer (at most
            ``ceil(H / block_k)`` of them).
    Returns:
        ``[P, T*K + T, 2*BR]`` fp32 partial sums (``P <= split_k``; their sum is the shrink);
        row ``t*K+k`` (per-expert A) or ``T*K + t`` (shared A) holds ``[x A_gate^T | x A_up^T]``
        for the items the alignment placed; other rows are unset.
    """
    T, H = x_TH.shape
    BR = block_r(lora.max_rank)
    k_per_split, parts = split_columns(H, split_k, block_k)
    out = torch.empty(parts, T * top_k + T, 2 * BR, dtype=torch.float32, device=x_TH.device)
    a = lora.gate_up_a
    _lora_shrink_kernel[(al.max_blocks, parts)](
        x_TH, a, lora.gate_up_a_shared, lora.slot_rank, al.sorted_ids, al.block_bucket,
        al.num_post_pad, out, al.num_items, T * top_k, top_k, lora.num_local_experts, H,
        lora.a_half_rows, k_per_split, out[0].numel(), x_TH.stride(0), x_TH.stride(1),
        a.stride(0), a.stride(1), a.stride(2), a.stride(3), BLOCK_M=al.block_m,
        BLOCK_K=block_k, BLOCK_R=BR, num_warps=num_warps)
    return out


def empty_down_shrink_parts(num_pairs: int, inter: int, block_n: int, max_rank: int,
                            device) -> torch.Tensor:
    """``[ceil(I_l / block_n), T*K, BR]`` fp32: the down shrink as gate_up's epilogue writes it
    (one partial per n-tile)."""
    return torch.empty(triton.cdiv(inter, block_n), num_pairs, block_r(max_rank),
                       dtype=torch.float32, device=device)


def gate_up(x_TH, w_gate_up_EXH, al: Alignment, top_k: int, token_slot_T=None,
            slot_enabled_S=None, lora: MoELoRAWeights | None = None, shrink=None,
            activation="silu", bias_EX: torch.Tensor | None = None, *, block_n: int = 64,
            block_k: int = 64, num_warps: int = 4, num_stages: int = 3,
            run_loop: bool = True, lora_runs: int = 1, fuse_down_shrink: bool = False,
            down_shrink_runs: int = 1, x_scale: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None, group_m: int = 1):
    """Base gate_up + LoRA expand + activation for a base alignment.

    Args:
        x_TH: ``[T, H]``; w_gate_up_EXH: ``[E_l, 2*I_l, H]`` (gate rows then up rows).
        al: base alignment of the ``T*K`` pairs by expert (rows ordered by slot).
        shrink: output of :func:`lora_shrink` when ``lora`` is given (``[P, N', 2*BR]``
            partials, or one ``[N', 2*BR]`` buffer).
        run_loop: expand loop over the block's slot runs (else one slot at a time, each
            found by a reduction); lora_runs: slot runs per expand dot (:func:`num_runs`).
        activation: a name or an ``Activation`` (gpt-oss's clamped SwiGLU reads its
            alpha and limit); bias_EX: ``[E_l, 2*I_l]`` gate then up bias, or None.
        fuse_down_shrink: also compute the down shrink ``h A_down^T`` in the epilogue,
            ``down_shrink_runs`` slot runs per dot.
        x_scale: FP8 experts only: ``x_TH`` is already quantized (e4m3, from
            :func:`~moelora_dist.kernels.block_fp8.ops.quantize_act`) and these are its
            ``[T, ceil(H / 128)]`` scales; ``out_dtype`` is then the dtype of ``h``.
        group_m: programs in groups of this many row blocks, row block fastest inside a
            group (:func:`check_group_m`; 1: each row block sweeps its columns in turn).
    Returns:
        ``h`` ``[T*K, I_l]`` in ``out_dtype or x_TH.dtype`` (rows of invalid pairs unset); with
        ``fuse_down_shrink``, ``(h, dshrink_parts)`` (:func:`empty_down_shrink_parts`, rows of
        pairs with an enabled slot set), the ``dshrink`` that :func:`down` takes.
    """
    act_spec = as_activation(activation)
    act = check_activation(act_spec)
    T, H = x_TH.shape
    E, two_i, _ = w_gate_up_EXH.shape
    inter = two_i // 2
    N = T * top_k
    _check_prequant(x_TH, x_scale, w_gate_up_EXH)
    h = torch.empty(N, inter, dtype=out_dtype or x_TH.dtype, device=x_TH.device)
    has_lora = lora is not None
    fuse_down_shrink = fuse_down_shrink and has_lora
    w, fp8_args, block_k = _fp8_args(w_gate_up_EXH, h, block_k)
    dparts = None
    if has_lora:
        BR = block_r(lora.max_rank)
        b, da = lora.gate_up_b, lora.down_a
        if fuse_down_shrink:
            dparts = empty_down_shrink_parts(N, inter, block_n, lora.max_rank, x_TH.device)
        lora_args = (token_slot_T, slot_enabled_S, lora.slot_rank, lora.gate_up_a_shared,
                     shrink, b, da, dparts if dparts is not None else h)
        lora_strides = (*b.stride(), *da.stride())
    else:
        BR = 16
        lora_args = (h,) * 8  # never read: HAS_LORA=False removes every access
        lora_strides = (0,) * 8
    bias = bias_EX.contiguous() if bias_EX is not None else h  # h: never read without bias
    sparts, spart_stride = _parts(shrink)
    grid = (al.max_blocks * triton.cdiv(inter, block_n),)
    _gate_up_kernel[grid](
        x_TH, w, h, al.sorted_ids, al.block_bucket, al.num_post_pad, *lora_args, bias,
        N, top_k, H, inter, sparts, spart_stride, dparts[0].numel() if dparts is not None else 0,
        x_TH.stride(0), x_TH.stride(1), w.stride(0), w.stride(1),
        w.stride(2), *lora_strides, *fp8_args, *_scale_args(x_scale, h),
        bias.stride(0) if bias_EX is not None else 0,
        float(act_spec.alpha), float(act_spec.limit), check_group_m(group_m),
        HAS_LORA=has_lora, ACT=act,
        BLOCK_M=al.block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=BR,
        RUN_LOOP=run_loop, NUM_RUNS=num_runs(lora_runs), FUSE_DOWN_SHRINK=fuse_down_shrink,
        DS_RUNS=num_runs(down_shrink_runs), W_FP8=is_fp8(w_gate_up_EXH),
        X_FP8=x_scale is not None, HAS_BIAS=bias_EX is not None,
        WS_PER_TILE=_scale_per_tile(w_gate_up_EXH, block_n, (0, inter)),
        num_warps=num_warps, num_stages=num_stages)
    return (h, dparts) if fuse_down_shrink else h


def down_shrink(h, lora: MoELoRAWeights, al: Alignment, top_k: int, token_slot_T,
                slot_enabled_S, *, block_k: int = 64, num_warps: int = 4,
                lora_runs: int | None = None, split_k: int = 1) -> torch.Tensor:
    """``h A_down^T`` per pair from the stored ``h``.

    Args:
        h: ``[T*K, I_l]``; al: the base alignment.
        lora_runs: None: one slot at a time (``h`` read once per slot of a block); else that
            many slot runs stacked per dot (``h`` read once per ``lora_runs`` runs).
        split_k: programs per block along I, each writing its own partial buffer (at most
            ``ceil(I_l / block_k)``): at decode sizes a block holds a few rows and its loop
            over I is all latency.
    Returns:
        ``[P, T*K, BR]`` fp32 partial sums (``P <= split_k``; their sum, which :func:`down`
        takes, is the shrink), set for the pairs with an enabled slot (other rows unset,
        never read).
    """
    N, inter = h.shape
    BR = block_r(lora.max_rank)
    k_per_split, parts = split_columns(inter, split_k, block_k)
    out = torch.empty(parts, N, BR, dtype=torch.float32, device=h.device)
    a = lora.down_a
    args = (h, a, al.sorted_ids, al.block_bucket, al.num_post_pad, token_slot_T,
            slot_enabled_S, lora.slot_rank, out, N, top_k, inter, k_per_split, out[0].numel(),
            *a.stride())
    grid = (al.max_blocks, parts)
    if lora_runs is None:
        _down_shrink_kernel[grid](*args, BLOCK_M=al.block_m, BLOCK_K=block_k, BLOCK_R=BR,
                                  num_warps=num_warps)
    else:
        _down_shrink_runs_kernel[grid](
            *args, BLOCK_M=al.block_m, BLOCK_K=block_k, BLOCK_R=BR,
            NUM_RUNS=num_runs(lora_runs), num_warps=num_warps)
    return out


def down(h, w_down_EHI, topk_weights_TK, al: Alignment, top_k: int, token_slot_T=None,
         slot_enabled_S=None, lora: MoELoRAWeights | None = None, dshrink=None,
         bias_EH: torch.Tensor | None = None, *, block_n: int = 64, block_k: int = 64,
         num_warps: int = 4, num_stages: int = 3, run_loop: bool = True, lora_runs: int = 1,
         h_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
         prefetch: bool | None = None, group_m: int = 1):
    """Base down + LoRA expand, times the top-k weight, per pair.

    Args:
        h: ``[T*K, I_l]``; w_down_EHI: ``[E_l, H, I_l]``; topk_weights_TK: ``[T, K]`` fp32.
        dshrink: ``[P, T*K, BR]`` fp32 partials from :func:`down_shrink` (or a fused down
            shrink) when ``lora`` is given, summed here in order, or one ``[T*K, BR]`` buffer.
        run_loop, lora_runs: the expand, as in :func:`gate_up`.
        prefetch: load the expand's first shrink and factor tiles before the base K loop
            (None: for tiles of at most :data:`PREFETCH_MAX_TILE`).
        bias_EH: ``[E_l, H]`` down bias added before the top-k weight, or None.
        h_scale: FP8 experts only: ``h`` is already quantized (e4m3) and these are its
            ``[T*K, ceil(I_l / 128)]`` scales; ``out_dtype`` is then the output's dtype.
        group_m: the program order, as in :func:`gate_up`.
    Returns:
        ``[T*K, H]`` in ``out_dtype or h.dtype``; rows of pairs with an invalid expert are
        unset.
    """
    N, inter = h.shape
    E, H, _ = w_down_EHI.shape
    _check_prequant(h, h_scale, w_down_EHI)
    out = torch.empty(N, H, dtype=out_dtype or h.dtype, device=h.device)
    tw = topk_weights_TK.contiguous()
    if tw.dtype != torch.float32:
        tw = tw.float()
    w, fp8_args, block_k = _fp8_args(w_down_EHI, h, block_k)
    has_lora = lora is not None
    if has_lora:
        BR = block_r(lora.max_rank)
        b = lora.down_b
        lora_args = (token_slot_T, slot_enabled_S, lora.slot_rank, lora.down_b_shared,
                     dshrink, b)
        b_strides = b.stride()
    else:
        BR, lora_args, b_strides = 16, (h,) * 6, (0,) * 4
    bias = bias_EH.contiguous() if bias_EH is not None else out  # never read without bias
    grid = (al.max_blocks * triton.cdiv(H, block_n),)
    dparts, dpart_stride = _parts(dshrink if has_lora else None)
    _down_kernel[grid](
        h, w, out, tw, al.sorted_ids, al.block_bucket, al.num_post_pad, *lora_args, bias,
        N, top_k, H, inter, dparts, dpart_stride, w.stride(0), w.stride(1), w.stride(2),
        *b_strides, *fp8_args, *_scale_args(h_scale, out),
        bias.stride(0) if bias_EH is not None else 0, check_group_m(group_m),
        HAS_LORA=has_lora, BLOCK_M=al.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=BR, RUN_LOOP=run_loop, NUM_RUNS=num_runs(lora_runs),
        W_FP8=is_fp8(w_down_EHI), X_FP8=h_scale is not None, HAS_BIAS=bias_EH is not None,
        WS_PER_TILE=_scale_per_tile(w_down_EHI, block_n, (0,)),
        PREFETCH=_prefetch(prefetch, al.block_m, block_n), num_warps=num_warps,
        num_stages=num_stages)
    return out


def topk_sum(out_NH: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int,
             out_dtype: torch.dtype | None = None, *, block_h: int = 1024) -> torch.Tensor:
    """``[T*K, H]`` weighted pair outputs -> ``[T, H]``, skipping invalid experts (fp32 sum)."""
    T, K = topk_ids_TK.shape
    H = out_NH.shape[1]
    y = torch.empty(T, H, dtype=out_dtype or out_NH.dtype, device=out_NH.device)
    if T:
        _topk_sum_kernel[(T, triton.cdiv(H, block_h))](
            out_NH, topk_ids_TK.contiguous(), y, H, K, num_experts, y.stride(0),
            BLOCK_H=block_h)
    return y
