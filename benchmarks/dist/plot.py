"""Plots of the two-GPU benchmark CSVs (needs matplotlib, which the project does not require).

    python benchmarks/dist/plot.py benchmarks/results
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def plot_dispatch(rows: list[dict], out: Path) -> None:
    """Time against the bytes per rank, and the ratio to raw NCCL with the issue's targets
    (rows of ``benchmarks/dist/bench_dispatch.py``: ``scenario`` uniform only)."""
    rows = [r for r in rows if r.get("scenario", "uniform") == "uniform"]
    if not rows or "fixed_us" not in rows[0]:
        print(f"{out}: no rows of the current dispatch benchmark format; not plotted")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    mb = [float(r["dispatch_MB_per_rank"]) for r in rows]
    series = [("raw_us", "raw NCCL, eager", "k--"), ("raw_graph_us", "raw NCCL, graph", "k:"),
              ("fixed_us", "fixed, eager", "o-"), ("fixed_graph_us", "fixed, graph", "s-"),
              ("fixed_nobypass_us", "fixed no bypass, eager", "o:"),
              ("static_us", "static, eager", "x:"), ("static_graph_us", "static, graph", "x-"),
              ("uneven_us", "uneven, eager", "v:")]
    for key, label, style in series:
        pts = [(m, float(r[key])) for m, r in zip(mb, rows) if r.get(key)]
        if pts:
            axes[0].loglog(*zip(*pts), style, label=label)
    for key, base, label, style in (("fixed_us", "raw_us", "fixed, eager", "o-"),
                                    ("fixed_graph_us", "raw_graph_us", "fixed, graph", "s-"),
                                    ("static_graph_us", "raw_graph_us", "static, graph", "x-")):
        pts = [(m, float(r[key]) / float(r[base])) for m, r in zip(mb, rows)
               if r.get(key) and r.get(base) and r.get("correct") == "True"]
        if pts:
            axes[1].semilogx(*zip(*pts), style, label=label)
    axes[1].plot([8, 64, 64, max(mb + [256])], [1.3, 1.3, 1.1, 1.1], color="grey", lw=0.8,
                 label="target")
    ep, dev = rows[0].get("ep", "2"), rows[0].get("device", "")
    axes[0].set(xlabel="dispatch bytes per rank (MB)", ylabel="dispatch + combine (us)",
                title=f"all-to-all dispatch + combine, EP {ep}, {dev}")
    axes[1].set(xlabel="dispatch bytes per rank (MB)", ylabel="time / raw NCCL",
                title="time / raw NCCL of the same bytes")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_layer(prefill: list[dict], decode: list[dict], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels, vals = [], []
    for r in prefill:
        labels.append(f"T={r['tokens']}\n{r['dispatcher']}")
        T = float(r["tokens"])
        g1, g2 = r.get("one_gpu_graph_ms"), r.get("ep2_graph_ms")
        vals.append((T / float(r["one_gpu_ms"]) / 1e3, T / float(r["ep2_ms"]) / 1e3,
                     T / float(g1) / 1e3 if g1 else 0, T / float(g2) / 1e3 if g2 else 0))
    x = range(len(labels))
    for j, name in enumerate(("one GPU, eager", "EP=2, eager", "one GPU, graph",
                              "EP=2, graph")):
        axes[0].bar([i + (j - 1.5) * 0.2 for i in x], [v[j] for v in vals], 0.2, label=name)
    axes[0].set_xticks(list(x), labels, fontsize=7)
    axes[0].set(ylabel="M tokens / s", title="LoRA MoE layer, Qwen3-30B-A3B shapes, 8 x r16")
    axes[0].legend(fontsize=7)
    T = [r["tokens"] for r in decode]
    xs = range(len(T))
    series = [("one_gpu_eager_ms", "one GPU eager"), ("ep2_eager_ms", "EP=2 eager"),
              ("ep2_graph_ms", "EP=2 CUDA graph")]
    for j, (key, name) in enumerate(series):
        axes[1].bar([i + (j - 1) * 0.27 for i in xs],
                    [float(r[key]) if r[key] else 0 for r in decode], 0.27, label=name)
    axes[1].set_xticks(list(xs), [f"T={t}" for t in T])
    axes[1].set(ylabel="ms", title="decode latency, all-reduce dispatcher")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(directory: str) -> None:
    d = Path(directory)
    if (d / "dist_dispatch.csv").exists():
        plot_dispatch(read(d / "dist_dispatch.csv"), d / "dist_dispatch.png")
    if (d / "dist_layer_prefill.csv").exists() and (d / "dist_layer_decode.csv").exists():
        plot_layer(read(d / "dist_layer_prefill.csv"), read(d / "dist_layer_decode.csv"),
                   d / "dist_layer.png")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
