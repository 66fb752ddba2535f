"""Issue 16's targets, judged per row of the kernel benchmark (columns ``target`` and
``target_met``; empty where no target applies). Times are graph replays, like the table's.

    base layer      at least as fast as the faster peer of the table at every (shape, T);
                    >= 85% of the measured HBM bandwidth where a batch touches every expert;
                    >= 60% of the measured bf16 peak at T = 16384
    LoRA 8 x r16    faster than the faster peer's LoRA path by >= 1.3x (T <= 1024) and >= 1.1x
                    (T >= 4096); LoRA extra <= 1.5x the adapters' floor (T <= 1024) and
                    <= 10% of the base layer (T >= 4096)
    LoRA 8 x r64    LoRA extra <= 1.5x the adapters' floor
"""

from __future__ import annotations

from benchmarks.kernels.peers import faster_peer


def judge(row: dict, touches_every_expert: bool) -> tuple[str, bool | str]:
    """(what is asked of this row, whether it is met) or ("", "")."""
    T, model, ms = row["T"], row["model"], row.get("ms_graph") or row.get("ms")
    if not row.get("ok") or ms in (None, ""):
        return "", ""
    asks = []
    if row["adapters"] == 0:
        peer = faster_peer(model, T, lora=False)
        if peer is not None:
            asks.append((f"<= faster peer {peer:.3f} ms", ms <= peer))
        if touches_every_expert:
            asks.append(("HBM >= 85%", row["hbm_pct"] >= 85))
        if T >= 16384:
            asks.append(("bf16 peak >= 60%", row["bf16_peak_pct"] >= 60))
    elif row["adapters"] == 8 and row["share"] == 1.0 and row["rank"] in (16, 64):
        extra, floor = row.get("lora_extra_ms"), row.get("adapter_floor_ms")
        if row["rank"] == 16:
            peer = faster_peer(model, T, lora=True)
            need = 1.3 if T <= 1024 else 1.1
            if peer is not None:
                asks.append((f">= {need}x faster than peer LoRA {peer:.3f} ms",
                             peer / ms >= need))
        if extra not in (None, "") and floor:
            if T <= 1024 or row["rank"] == 64:
                asks.append(("LoRA extra <= 1.5x adapter floor", extra <= 1.5 * floor))
            elif row["rank"] == 16:
                base = row.get("base_ms_graph")
                if base:
                    asks.append(("LoRA extra <= 10% of base", extra <= 0.1 * base))
    if not asks:
        return "", ""
    return "; ".join(a for a, _ in asks), all(bool(m) for _, m in asks)
