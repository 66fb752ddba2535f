"""The candidates the tuner measures: the heuristic first, then its neighbours, pruned by what
the shape makes sensible (no search of the full product: the device time is small).

Base layer (per problem): block sizes ``block_m`` near the rows per expert (a block of fewer
rows than the expert has reads the expert's weights once per block; a block of many more pads
the GEMM), and for each a short list of ``(block_n, block_k, num_warps, num_stages)`` tiles for
gate_up and, independently, for down (the two kernels are timed apart, so the lists add up
instead of multiplying). LoRA (per problem): the base winner with one LoRA switch changed at a
time, the fused variants, and the heuristic config, then one more round that merges the best
value of every switch.
"""

from __future__ import annotations

import dataclasses

from moelora_dist.kernels.constants import next_power_of_2
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
MAX_FUSED_PARTS = 32  # fuse_down_shrink writes one partial per gate_up n-tile: keep them few
MAX_FUSED_SHRINK_REREADS = 16  # fuse_shrink re-reads A once per n-tile


def block_ms(rows_per_expert: float, heuristic_bm: int) -> list[int]:
    """The smallest power of two that holds an expert's rows (capped at 128: each expert's
    weights read once), the heuristic's ``block_m``, then the two below the first."""
    top = min(128, max(16, next_power_of_2(max(1, int(rows_per_expert + 0.999)))))
    out = [top, heuristic_bm] + [b for b in (top // 2, top // 4) if b >= 16]
    return list(dict.fromkeys(out))


def gate_up_tiles(cfg: MoEConfig, bm: int) -> list[MoEConfig]:
    """``cfg`` with ``block_m = bm`` and each gate_up tile of the list (``cfg``'s own first)."""
    first = dataclasses.replace(cfg, block_m=bm)
    out = [first] + [dataclasses.replace(first, block_n=n, block_k=k, num_warps=w, num_stages=s)
                     for n, k, w, s in TILES[bm]]
    return _unique(out)


def down_tiles(cfg: MoEConfig) -> list[MoEConfig]:
    """``cfg`` with each down tile of its ``block_m``'s list (``cfg``'s own first)."""
    out = [cfg] + [dataclasses.replace(cfg, down_block_n=n, down_block_k=k, down_num_warps=w,
                                       down_num_stages=s)
                   for n, k, w, s in TILES[cfg.block_m]]
    return _unique(out)


def with_lora_fields(base: MoEConfig, lora_from: MoEConfig) -> MoEConfig:
    return dataclasses.replace(base, **{f: getattr(lora_from, f) for f in LORA_FIELDS})


def lora_candidates(base: MoEConfig, heuristic: MoEConfig, *, rows_per_expert: float,
                    adapters: int, inter: int) -> list[MoEConfig]:
    """Round one of a LoRA problem: the heuristic config, the base winner with the heuristic's
    LoRA switches, then that with one switch changed at a time, then the fused variants
    (``rows_per_expert``: valid pairs per local expert; ``inter``: I_l)."""
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
    n_tiles = -(-inter // base.block_n)
    if n_tiles <= MAX_FUSED_PARTS:
        out.append(rep(start, fuse_down_shrink=True))
    if n_tiles <= MAX_FUSED_SHRINK_REREADS:
        for v in (1, 2, 4):
            fused = rep(start, fuse_shrink=True, run_loop=True, shrink_split_k=1, lora_runs=v)
            out.append(fused)
            if n_tiles <= MAX_FUSED_PARTS:
                out.append(rep(fused, fuse_down_shrink=True))
    return _unique(out)


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
    return cfg


def _unique(cfgs: list[MoEConfig]) -> list[MoEConfig]:
    out = []
    for c in cfgs:
        try:
            c.check()
        except ValueError:
            continue  # a contradictory combination (e.g. the slot loop with fuse_shrink)
        if c not in out:
            out.append(c)
    return out

