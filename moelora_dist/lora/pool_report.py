"""The memory table of a :class:`~moelora_dist.lora.pool.LoRAPool`, for people to read."""

from __future__ import annotations

import torch


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _pattern(name: str) -> str:
    """``moe.12.down_a`` -> ``moe.*.down_a``: layers of one shape share a table row."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def describe_pool(pool, tensors: dict[str, torch.Tensor]) -> str:
    """One row per kind of buffer (name pattern, count, shape of one, dtype, bytes of all),
    then the total, bytes per slot, and the occupied slots."""
    cfg = pool.config
    S = cfg.max_loras
    groups: dict[tuple[str, str, str], list[int]] = {}
    for name, t in tensors.items():
        key = (_pattern(name), str(list(t.shape)), str(t.dtype).replace("torch.", ""))
        g = groups.setdefault(key, [0, 0])
        g[0] += 1
        g[1] += t.numel() * t.element_size()
    rows = [(n, str(c), s, d, b) for (n, s, d), (c, b) in groups.items()]
    total = sum(r[4] for r in rows)
    w_name = max([len("buffer")] + [len(r[0]) for r in rows])
    w_shape = max([len("shape of one")] + [len(r[2]) for r in rows])
    lines = [
        f"LoRA pool on rank {pool.rank_layout.rank} ({pool.rank_layout.layout}): {S} slots, "
        f"max rank {cfg.max_rank}, {str(cfg.dtype).replace('torch.', '')} on {cfg.device}"
        f"{', outer-shared only' if cfg.outer_shared_only else ''}",
        f"{'buffer':<{w_name}}  {'count':>5}  {'shape of one':<{w_shape}}  {'dtype':<8}  "
        f"{'bytes':>14}",
    ]
    lines += [f"{n:<{w_name}}  {c:>5}  {s:<{w_shape}}  {d:<8}  {b:>14,}" for n, c, s, d, b in rows]
    lines.append(f"{'total':<{w_name}}  {'':>5}  {'':<{w_shape}}  {'':<8}  {total:>14,}  "
                 f"({human_bytes(total)}, {human_bytes(total // S)} per slot)")
    used = pool.loaded()
    lines.append(f"slots used: {len(used)}/{S}")
    for name, slot in sorted(used.items(), key=lambda kv: kv[1]):
        rank = int(pool.slot_rank_S[slot])
        pin = ", pinned" if slot in pool.pinned else ""
        lines.append(f"  slot {slot}: {name} (rank {rank}{pin})")
    return "\n".join(lines)
