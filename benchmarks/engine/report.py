"""CSV and plot of ``bench_engine.py``: one row per (concurrency, mode); bars of output tokens/s
per concurrency with the lora8/base ratio over each LoRA bar, and the graph decode step's
share of its HBM roofline beside them. Files: ``engine_<device><suffix>.csv/.png``, or
``engine_fp8_<device><suffix>.*`` for FP8 weights (``weights`` column ``fp8``), so one run
does not overwrite the other's."""

from __future__ import annotations

import logging
import os

from benchmarks.common import device_tag, write_csv

log = logging.getLogger("bench_engine")
# the ``model`` column -> file name suffix (the Qwen3 shape has none)
SUFFIX = {"tiny": "_tiny", "tiny-gpt-oss": "_tiny_gpt-oss", "gpt-oss-20b-shape": "_gpt-oss-20b"}


def write_outputs(rows: list[dict], m: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    fp8 = "fp8_" if m.get("weights") == "fp8" else ""
    layout = f"_tp{m['tp']}_ep{m['ep']}" if m.get("tp", 1) > 1 else ""
    path = os.path.join(out_dir, f"engine_{fp8}{device_tag(m)}" + SUFFIX.get(m["model"], "")
                        + layout)
    write_csv(path + ".csv", rows, m)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: wrote %s.csv, no plot", path)
        return path
    Bs = sorted({r["concurrency"] for r in rows})
    find = lambda b, mode: next(r for r in rows  # noqa: E731
                                if r["concurrency"] == b and r["mode"] == mode)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    w = 0.38
    for k, mode in enumerate(("base", "lora8")):
        xs = [i - w / 2 + k * w for i in range(len(Bs))]
        ys = [find(b, mode)["out_tok_s"] for b in Bs]
        ax.bar(xs, ys, w, label="no adapter" if mode == "base"
               else f"{m['adapters']} adapters r={m['rank']}")
        if mode == "lora8":
            for x, b in zip(xs, Bs):
                r = find(b, mode)
                ax.annotate(f"{r.get('out_tok_s_ratio', 0):.3f}x", (x, r["out_tok_s"]),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(Bs)), [f"{b} seqs" for b in Bs])
    ax.set_yscale("log")
    ax.set_ylabel("output tokens/s (whole run)")
    ax.legend(fontsize=8)
    plotted = False
    for mode, marker in (("base", "o"), ("lora8", "s")):
        pts = [(b, find(b, mode).get("roofline")) for b in Bs]
        pts = [(b, v) for b, v in pts if v not in (None, "")]
        if pts:
            ax2.plot([Bs.index(b) for b, _ in pts], [100 * float(v) for _, v in pts],
                     marker=marker, label=mode)
            plotted = True
    ax2.set_xticks(range(len(Bs)), [str(b) for b in Bs])
    ax2.set_ylabel("graph decode step, % of HBM roofline")
    ax2.set_xlabel("sequences")
    if plotted:
        ax2.legend(fontsize=8)
    weights = "FP8 weights, " if fp8 else ""
    fig.suptitle(f"engine, {m['model']} {m['layers']} layers {weights}{m['dtype']}, prompt "
                 f"{rows[0]['prompt_len']} / output {rows[0]['output_len']}\n{m['device']}, "
                 f"{m['utc']} UTC, commit {m['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".png", dpi=110)
    return path
