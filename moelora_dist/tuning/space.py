"""The candidates the tuner measures: the heuristic first, then its neighbours, pruned by what
the shape makes sensible (no search of the full product: the device time is small).

Base layer (per problem): block sizes ``block_m`` near the rows per expert (a block of many
more rows pads the GEMM; one of fewer makes an expert several blocks, whose weight reads share
L2 only when the program order groups them: ``group_m``), and for each a short list of
``(block_n, block_k, num_warps, num_stages)`` tiles for gate_up and, independently, for down
(the two kernels are timed apart, so the lists add up instead of multiplying), then the winner
in each program order of :data:`GROUP_MS`. LoRA (per problem): the base winner with one LoRA
switch changed at a time (and in each program order), the fused variants, and the heuristic
config, then one more round that merges the best value of every switch.

FP8 experts (``fp8=True``): the kernels run ``block_k = 128`` for gate_up and down whatever the
config says (the scale group: ``kernels/moe_gemm/ops.py::_fp8_args``), so every candidate is
normalized to ``block_k = 128, down_block_k = None`` (:func:`for_fp8`) and candidates that then
coincide are timed once; the fused-shrink gate_up reads bf16/fp16 weights only and the layer
takes the separate shrink for FP8 experts whatever ``fuse_shrink`` says, so no candidate sets
it. The tile lists are :func:`fp8_tiles`.
"""

from __future__ import annotations

import dataclasses

from moelora_dist.kernels.constants import FP8_GROUP, next_power_of_2
from moelora_dist.kernels.moe_lora.configs import LORA_FIELDS, MoEConfig

# (block_n, block_k, num_warps, num_stages) per block_m; the heuristic's tiles first.
TILES = {
    16: [(64, 128, 4, 4), (32, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (64, 64, 4, 5),
         (128, 64, 4, 4), (32, 256, 4, 4), (64, 128, 8, 4)],
    32: [(64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 5), (128, 128, 8, 3), (32, 128, 4, 4),
         (64, 256, 4, 3)],
    64: [(128, 64, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3), (64, 128, 4, 3), (256, 64, 8, 3),
         (128, 64, 8, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3), (64, 64, 4, 4), (128, 64, 8, 4),
          (128, 32, 8, 4)],
}
# FP8 experts: the bf16 lists at block_k 128 (duplicates dropped), then tiles for large T. A K
# step of 128 moves half the weight bytes of a bf16 one, and gate_up keeps two fp32
# accumulators (gate and up) rescaled by the block scales every step, so at many rows per expert
# a narrower n-tile keeps them in registers (block_m 128 with block_n 64, 4 or 8 warps), and a
# deeper pipeline fits where the activation tile is small (block_m 64, 5 stages). A gate_up
# stage holds block_m x 128 bf16 activations and 2 x block_n x 128 e4m3 weights: 48 KiB at
# 128 x 64, so 5 stages of it (240 KiB) would exceed the H200's 227 KiB and are not listed.
FP8_EXTRA_TILES = {
    32: [(64, 128, 8, 4)],
    64: [(128, 128, 4, 4), (64, 128, 8, 4), (64, 128, 4, 5), (128, 128, 8, 4)],
    128: [(64, 128, 4, 3), (64, 128, 8, 3), (64, 128, 8, 4), (128, 128, 4, 3), (32, 128, 4, 4)],
}
# Program orders tried on each base winner and each LoRA start (row blocks per group; a runtime
# argument of the kernels, so no candidate here costs a compile).
GROUP_MS = (1, 8, 16, 64, 256)
FP8_BLOCK_K = FP8_GROUP  # the FP8 kernels step K by the 128-column scale group
MAX_FUSED_PARTS = 32  # fuse_down_shrink writes one partial per gate_up n-tile: keep them few
MAX_FUSED_SHRINK_REREADS = 16  # fuse_shrink re-reads A once per n-tile


def block_ms(rows_per_expert: float, heuristic_bm: int) -> list[int]:
    """The smallest power of two that holds an expert's mean rows (capped at 128), the
    heuristic's ``block_m``, the next larger one where the mean fills more than half of the
    first (about half the experts then hold more rows than the first: one block each instead
    of two, for more padded rows; the H200's Mixtral T = 256 base, 64 rows per expert on 64-row
    blocks, stayed 1.13x the peers' time in S9/1), then the two below the first."""
    top = min(128, max(16, next_power_of_2(max(1, int(rows_per_expert + 0.999)))))
    larger = [2 * top] if top < 128 and rows_per_expert > top / 2 else []
    out = [top, heuristic_bm] + larger + [b for b in (top // 2, top // 4) if b >= 16]
    return list(dict.fromkeys(out))


def for_fp8(cfg: MoEConfig) -> MoEConfig:
    """``cfg`` with the K steps the FP8 kernels run, 128 in gate_up and down (``down_block_k``
    None: gate_up's)."""
    return dataclasses.replace(cfg, block_k=FP8_BLOCK_K, down_block_k=None)


def fp8_tiles(bm: int) -> list[tuple[int, int, int, int]]:
    """The FP8 tile list of ``block_m = bm``: :data:`TILES`' at block_k 128, then
    :data:`FP8_EXTRA_TILES`, each once."""
    tiles = [(n, FP8_BLOCK_K, w, s) for n, _, w, s in TILES[bm] + FP8_EXTRA_TILES.get(bm, [])]
    return list(dict.fromkeys(tiles))


def _tiles(bm: int, fp8: bool) -> list[tuple[int, int, int, int]]:
    return fp8_tiles(bm) if fp8 else TILES[bm]


def gate_up_tiles(cfg: MoEConfig, bm: int, fp8: bool = False) -> list[MoEConfig]:
    """``cfg`` with ``block_m = bm`` and each gate_up tile of the list (``cfg``'s own first)."""
    first = dataclasses.replace(cfg, block_m=bm)
    out = [first] + [dataclasses.replace(first, block_n=n, block_k=k, num_warps=w, num_stages=s)
                     for n, k, w, s in _tiles(bm, fp8)]
    return _unique(out, fp8)


def down_tiles(cfg: MoEConfig, fp8: bool = False) -> list[MoEConfig]:
    """``cfg`` with each down tile of its ``block_m``'s list (``cfg``'s own first)."""
    out = [cfg] + [dataclasses.replace(cfg, down_block_n=n, down_block_k=k, down_num_warps=w,
                                       down_num_stages=s)
                   for n, k, w, s in _tiles(cfg.block_m, fp8)]
    return _unique(out, fp8)


def with_lora_fields(base: MoEConfig, lora_from: MoEConfig) -> MoEConfig:
    return dataclasses.replace(base, **{f: getattr(lora_from, f) for f in LORA_FIELDS})


def lora_candidates(base: MoEConfig, heuristic: MoEConfig, *, rows_per_expert: float,
                    adapters: int, inter: int, fp8: bool = False) -> list[MoEConfig]:
    """Round one of a LoRA problem: the heuristic config, the base winner with the heuristic's
    LoRA switches, then that with one switch changed at a time, then the fused variants
    (``rows_per_expert``: valid pairs per local expert; ``inter``: I_l; ``fp8``: FP8 experts,
    no fused shrink)."""
    start = with_lora_fields(base, heuristic)
    rep = dataclasses.replace
    out = [heuristic, start]
    for v in (False, True):
        out.append(rep(start, run_loop=v))
    for v in (1, 2, 4):
        out.append(rep(start, run_loop=True, lora_runs=v))
    for v in (0, 1, 2, 4):
        out.append(rep(start, down_shrink_runs=v))
    for v in (16, 32, 64):
        out.append(rep(start, lora_block_m=v))
    for v in (64, 256):
        out.append(rep(start, shrink_block_k=v))
    if rows_per_expert / max(adapters, 1) < 16:
        for v in (2, 4, 8):  # a shrink block holds few rows: its loop over H is all latency
            out.append(rep(start, shrink_split_k=v))
        for v in (2, 3, 6):  # the down shrink's loop over I likewise
            out.append(rep(start, down_shrink_split_k=v))
    for v in (False, True):
        out.append(rep(start, lora_prefetch=v))
    for v in GROUP_MS:
        out.append(rep(start, group_m=v))
    n_tiles = -(-inter // base.block_n)
    if n_tiles <= MAX_FUSED_PARTS:
        out.append(rep(start, fuse_down_shrink=True))
    if n_tiles <= MAX_FUSED_SHRINK_REREADS and not fp8:
        for v in (1, 2, 4):
            fused = rep(start, fuse_shrink=True, run_loop=True, shrink_split_k=1, lora_runs=v)
            out.append(fused)
            if n_tiles <= MAX_FUSED_PARTS:
                out.append(rep(fused, fuse_down_shrink=True))
    return _unique(out, fp8)


def merged(start: MoEConfig, timed: list[tuple[MoEConfig, float]]) -> MoEConfig | None:
    """Round two: ``start`` with every LoRA field set to the value of the fastest candidate
    that differs from ``start`` in that field alone (None when that is nothing new)."""
    best: dict[str, tuple[float, object]] = {}
    for cfg, ms in timed:
        diff = [f for f in LORA_FIELDS if getattr(cfg, f) != getattr(start, f)]
        if len(diff) == 1 and (diff[0] not in best or ms < best[diff[0]][0]):
            best[diff[0]] = (ms, getattr(cfg, diff[0]))
    base_ms = next((ms for cfg, ms in timed if cfg == start), None)
    changes = {f: v for f, (ms, v) in best.items() if base_ms is None or ms < base_ms}
    if len(changes) < 2:  # one change alone was already timed
        return None
    cfg = dataclasses.replace(start, **changes)
    if cfg.fuse_shrink:
        cfg = dataclasses.replace(cfg, run_loop=True, shrink_split_k=1)
    if cfg.fuse_down_shrink:
        cfg = dataclasses.replace(cfg, down_shrink_split_k=1)
    return cfg


def _unique(cfgs: list[MoEConfig], fp8: bool = False) -> list[MoEConfig]:
    """The valid configs of ``cfgs`` in order, each once. FP8: each after :func:`for_fp8`, so
    configs that run the same kernels are one; fused-shrink ones dropped (never run)."""
    out = []
    for c in cfgs:
        if fp8:
            if c.fuse_shrink:
                continue
            c = for_fp8(c)
        try:
            c.check()
        except ValueError:
            continue  # a contradictory combination (e.g. the slot loop with fuse_shrink)
        if c not in out:
            out.append(c)
    return out

