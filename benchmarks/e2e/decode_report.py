"""CSV and plot of ``bench_decode.py``: one row per (batch, decode path, mode), bars of tokens/s
with the lora8/base ratio written over each LoRA bar."""

from __future__ import annotations

import logging
import os

from benchmarks.common import write_csv

log = logging.getLogger("bench_decode")


def write_outputs(rows, m, out_dir) -> str:
    os.makedirs(out_dir, exist_ok=True)
    # the default shape keeps its historical file name; others are named after the shape
    suffix = {"tiny": "_tiny", "qwen3-30b-a3b-shape": ""}.get(
        m["model"], "_" + m["model"].removesuffix("-shape"))
    tag = m["device"].replace(" ", "_") + suffix
    path = os.path.join(out_dir, f"e2e_decode_{tag}")
    write_csv(path + ".csv", rows, m)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: wrote %s.csv, no plot", path)
        return path
    batches = sorted({r["batch"] for r in rows})
    decodes = list(dict.fromkeys(r["decode"] for r in rows))
    find = lambda b, d, mode: next((r for r in rows if r["batch"] == b  # noqa: E731
                                    and r["decode"] == d and r["mode"] == mode), None)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    n = 2 * len(decodes)
    width = 0.8 / n
    for k, (d, mode) in enumerate((d, mode) for d in decodes for mode in ("base", "lora8")):
        xs = [i - 0.4 + width * (k + 0.5) for i, b in enumerate(batches) if find(b, d, mode)]
        ys = [find(b, d, mode)["tokens_per_s"] for b in batches if find(b, d, mode)]
        label = f"{d}, " + ("no adapter" if mode == "base" else
                            f"{m['adapters']} adapters r={m['rank']}")
        ax.bar(xs, ys, width, label=label)
        if mode == "lora8":
            for x, b in zip(xs, [b for b in batches if find(b, d, mode)]):
                r = find(b, d, mode)
                ax.annotate(f"{r['ratio_vs_base']:.3f}x", (x, r["tokens_per_s"]), ha="center",
                            va="bottom", fontsize=7)
    ax.set_xticks(list(range(len(batches))), [f"B={b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{m['model']}, {m['layers']} layers, {m['dtype']}, tp={m['tp']} ep={m['ep']}\n"
                 f"{m['device']}, {m['utc']} UTC, commit {m['commit']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".png", dpi=110)
    return path
