"""Host glue of the paged-attention family: the Triton paths of :mod:`.naive`, same signatures.

A step's attention is two launches per layer: :func:`rope_write` (q/k norm, rotary, the store
of k and v into their page slots) and :func:`paged_attention` (every sequence's new tokens
against its paged keys, decode and prefill chunks alike). Neither reads anything back to the
host and both grids depend only on ``T`` and ``B``, so a CUDA graph captures them; the block
tables, lengths and positions are read from device memory on every replay.

Tiles: a program holds ``BLOCK_Q`` tokens x the ``g`` query heads of one kv head as its rows.
Decode (one token per sequence) takes the fewest rows ``tl.dot`` allows (16); prefill chunks
take 64 rows. Keys are read ``BLOCK_N = 64`` positions at a time whatever the page size. A
decode step with fewer tiles than SMs splits each tile's keys over up to 8 programs that write
fp32 partials (sum, max, normalizer), as flash-decoding's split-KV; the split count depends on
``T``, ``B`` and the GPU only, so graphs capture it. With ``COMBINE_FUSED`` (read at each
call) the partials are merged in the same launch: each program adds 1 to its tile's int32
counter after its stores (an acq_rel atomic), and the one that arrives last merges all the
tile's partials and puts the counter back to 0; without it one more launch merges them. Both
use one merge, in split order from memory, so the result is deterministic and the same bits
whichever program arrives last and whichever path runs.

The counters (:func:`_tile_counters`) are one zeroed int32 buffer per device, allocated
outside graph capture and kept for the process; every layer's call uses them in turn and
leaves them 0. They belong to the stream order: two split calls running at once on different
streams would race (the engine runs attention on one stream). A call captured while the buffer
is too small uses the two launches rather than allocate inside the capture.
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.constants import next_power_of_2
from moelora_dist.kernels.device import capturing, num_sms
from moelora_dist.kernels.paged_attention.kernel import (LOG2E, _paged_attention_kernel,
                                                         _paged_combine_kernel,
                                                         _rope_write_kernel,
                                                         _rope_write_lora_kernel)

DECODE_ROWS = 16
PREFILL_ROWS = 64
BLOCK_N = 64
MIN_DOT_K = 16  # tl.dot's smallest inner dimension: heads narrower than this are zero-padded
MAX_SPLITS = 8  # key splits per decode tile
COMBINE_UNROLL = 8  # partials the combine loads at once (1: one at a time, as before)
# Head-dim columns one merge handles at a time (0: the whole head). The fused merge (the
# last split program) over the whole head: 10.2 us per layer at 1 sequence on an H200 (Qwen3
# heads, 512 keys, 8 splits) against 11.5 in 32-column chunks and 6.8 + 4.1 for two launches.
COMBINE_CHUNK_D = 0
COMBINE_FUSED = True  # the last split program of a tile merges (False: a combine launch)
LORA_HEAD_GROUP = 4  # heads per program of the page write with the q/k/v LoRA expand fused

_COUNTERS: dict[torch.device, torch.Tensor] = {}  # device -> int32 zeros, one per tile
_OUTGROWN: list[torch.Tensor] = []  # replaced counters: graphs captured on them still use them


def decode_splits(programs: int, sms: int) -> int:
    """Key splits per decode tile: when the tiles leave SMs idle (one sequence has one tile per
    kv head), enough for about two programs per SM, at most ``MAX_SPLITS``; none otherwise.
    Measured on an H200 (Qwen3 heads, 512 keys, GPU us per layer): at 1 sequence 19.6 unsplit,
    4.9 + 8.1 (the combine) in 16 splits; at 64 sequences (384 tiles) 30.8 unsplit, 25.3 + 3.8
    in 2, not worth the extra launch in a graph."""
    if programs >= sms:
        return 1
    return max(1, min(-(-2 * sms // max(programs, 1)), MAX_SPLITS))


def head_block(head_dim: int) -> int:
    """The kernel's head-dim tile: a power of two, at least ``tl.dot``'s minimum K (the q k^T
    product's inner dimension); the padding columns are masked to zero."""
    return max(MIN_DOT_K, next_power_of_2(head_dim))


def _tile_counters(device: torch.device, num_tiles: int) -> torch.Tensor | None:
    """int32 ``[>= num_tiles]`` zeros on ``device`` (every call leaves them 0), or None
    while a CUDA graph is being captured and the cached buffer is too small. At least one per
    SM, the most tiles a default split has (:func:`decode_splits` splits fewer tiles only)."""
    counters = _COUNTERS.get(device)
    if counters is not None and counters.numel() >= num_tiles:
        return counters
    if capturing(device):
        return None
    size = max(num_tiles, num_sms(device))
    if counters is not None:
        _OUTGROWN.append(counters)
        size = max(size, 2 * counters.numel())
    _COUNTERS[device] = torch.zeros(size, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def _check_pages(k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
    if k_pages.shape != v_pages.shape or not (k_pages.is_contiguous() and v_pages.is_contiguous()):
        raise ValueError(f"k and v pages must be contiguous [P, S, N_kv, D] of one shape; got "
                         f"{tuple(k_pages.shape)} and {tuple(v_pages.shape)}")


def rope_write(q_TND, k_TND, v_TND, positions_T, cos_PH, sin_PH, slot_mapping_T, k_pages,
               v_pages, q_norm_D=None, k_norm_D=None, eps: float = 1e-6,
               lora=None) -> torch.Tensor:
    """See :func:`moelora_dist.kernels.paged_attention.naive.rope_write`. q/k/v may be views
    of one fused projection (any token and head strides, unit stride in D).

    ``lora``: a :class:`~moelora_dist.kernels.dense_lora.ops.TokenLoRA` of the q/k/v group
    (modules 0, 1, 2) whose expand this launch fuses: each head's delta is added to the
    loaded projection (fp32, rounded once), as ``dense_expand`` would have stored it, before
    the norm and the rotary (programs of :data:`LORA_HEAD_GROUP` heads of one token)."""
    _check_pages(k_pages, v_pages)
    T, Nq, D = q_TND.shape
    Nk = k_TND.shape[1]
    if D % 2 or any(t.stride(2) != 1 for t in (q_TND, k_TND, v_TND)):
        raise ValueError("rope_write needs an even head dim with unit stride")
    if lora is not None and len(lora.b_list) != 3:
        raise ValueError(f"the page write fuses the q/k/v LoRA: 3 modules, got {len(lora.b_list)}")
    q_out = torch.empty(T, Nq, D, dtype=q_TND.dtype, device=q_TND.device)
    if T == 0:
        return q_out
    norm = q_norm_D is not None
    qn = q_norm_D if norm else q_TND
    kn = k_norm_D if norm else q_TND
    args = (q_TND, k_TND, v_TND, q_out, positions_T, cos_PH, sin_PH, slot_mapping_T, k_pages,
            v_pages, qn, kn, eps, q_TND.stride(0), q_TND.stride(1), k_TND.stride(0),
            k_TND.stride(1), v_TND.stride(0), v_TND.stride(1), q_out.stride(0),
            q_out.stride(1), cos_PH.stride(0), k_pages.stride(1), k_pages.stride(2))
    consts = dict(NUM_Q=Nq, NUM_KV=Nk, HALF=D // 2, BLOCK_HALF=next_power_of_2(D // 2),
                  HEAD_NORM=norm)
    if lora is None:
        _rope_write_kernel[(T,)](*args, BLOCK_H=next_power_of_2(max(Nq, Nk)), **consts)
        return q_out
    # The LoRA page write: per token, its query heads then its kv heads in groups of
    # LORA_HEAD_GROUP (each program's delta tile is that many heads x D/2 x R per half).
    hg = min(LORA_HEAD_GROUP, next_power_of_2(max(Nq, Nk)))
    q_groups = -(-Nq // hg)
    bq, bk, bv = lora.b_list
    _rope_write_lora_kernel[(T, q_groups + -(-Nk // hg))](
        *args, *lora.shrink_args(), bq, bk, bv, *bq.stride(), *bk.stride(), *bv.stride(),
        q_groups, HEAD_GROUP=hg, BLOCK_R=lora.block_r, **consts)
    return q_out


def paged_attention(q_TND, k_pages, v_pages, block_tables_BM, kv_lens_B, seg_indptr_B1, *,
                    scale: float, sliding_window: int | None = None,
                    decode_only: bool = False,
                    sinks_N: torch.Tensor | None = None,
                    num_splits: int | None = None) -> torch.Tensor:
    """See :func:`moelora_dist.kernels.paged_attention.naive.paged_attention`.

    ``decode_only``: every sequence adds one token (picks the decode tile, and splits each
    tile's keys over programs when the tiles alone leave the GPU idle: :func:`decode_splits`);
    a wrong True is still correct, only slower for long chunks. ``num_splits``: that split
    count instead (1: none). Integer inputs are int32 (block tables, lengths, offsets); ``q``
    has unit stride in D.
    """
    _check_pages(k_pages, v_pages)
    T, Nq, D = q_TND.shape
    B = int(kv_lens_B.shape[0])
    Nk = k_pages.shape[2]
    if Nq % Nk:
        raise ValueError(f"{Nq} query heads do not group over {Nk} kv heads")
    out = torch.empty_like(q_TND)
    if T == 0 or B == 0:
        return out
    group = Nq // Nk
    block_g = next_power_of_2(group)
    rows = DECODE_ROWS if decode_only else PREFILL_ROWS
    block_q = max(1, rows // block_g)
    blocks = T // block_q + B
    if num_splits is None:
        num_splits = decode_splits(blocks * Nk, num_sms(q_TND.device)) if decode_only else 1
    sinks = sinks_N.contiguous() if sinks_N is not None else out  # never read without sinks
    split = num_splits > 1
    if split:  # per (block, kv head, split): the unnormalized sum, then max and sum per row
        part = torch.empty(blocks * Nk * num_splits, block_q * block_g, head_block(D),
                           dtype=torch.float32, device=q_TND.device)
        part_ml = torch.empty(blocks * Nk * num_splits, 2, block_q * block_g,
                              dtype=torch.float32, device=q_TND.device)
    else:
        part = part_ml = out  # never read
    counters = _tile_counters(q_TND.device, blocks * Nk) if split and COMBINE_FUSED else None
    fused = counters is not None
    bd = head_block(D)
    chunk = min(bd, COMBINE_CHUNK_D) if COMBINE_CHUNK_D else bd
    _paged_attention_kernel[(blocks, Nk, num_splits)](
        q_TND, k_pages, v_pages, out, block_tables_BM, kv_lens_B, seg_indptr_B1, sinks, part,
        part_ml, counters if fused else out, B, scale * LOG2E, int(sliding_window or 0),
        num_splits, q_TND.stride(0), q_TND.stride(1), out.stride(0), out.stride(1),
        *k_pages.stride()[:3], *v_pages.stride()[:3], block_tables_BM.stride(0),
        PAGE_SIZE=k_pages.shape[1], GROUP=group, BLOCK_G=block_g, BLOCK_Q=block_q,
        BLOCK_N=BLOCK_N, HEAD_DIM=D, BLOCK_D=bd, HAS_SINKS=sinks_N is not None, SPLIT=split,
        FUSED=fused, UNROLL=COMBINE_UNROLL, CHUNK_D=chunk)
    if split and not fused:
        _paged_combine_kernel[(blocks, Nk, bd // chunk)](
            out, seg_indptr_B1, kv_lens_B, sinks, part, part_ml, B, num_splits, out.stride(0),
            out.stride(1), GROUP=group, BLOCK_G=block_g, BLOCK_Q=block_q, HEAD_DIM=D,
            BLOCK_D=bd, HAS_SINKS=sinks_N is not None, UNROLL=COMBINE_UNROLL, CHUNK_D=chunk)
    return out
