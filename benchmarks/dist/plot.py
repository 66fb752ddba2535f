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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for H in sorted({r["hidden"] for r in rows}, key=int):
        sub = [r for r in rows if r["hidden"] == H]
        mb = [float(r["dispatch_MB_per_rank"]) for r in sub]
        axes[0].loglog(mb, [float(r["raw_us"]) for r in sub], "o--", label=f"raw NCCL, H={H}")
        axes[0].loglog(mb, [float(r["ours_us"]) for r in sub], "o-", label=f"dispatch+combine, H={H}")
        axes[1].semilogx(mb, [float(r["ours_us"]) / float(r["raw_us"]) for r in sub], "o-",
                         label=f"H={H}, uneven splits, eager")
        graphed = [(m, float(r["static_graph_us"]) / float(r["raw_us"]))
                   for m, r in zip(mb, sub) if r.get("static_graph_us")]
        if graphed:
            axes[0].loglog([g[0] for g in graphed],
                           [g[1] * float(r["raw_us"]) for g, r in zip(graphed, sub)], "s-",
                           label=f"static, CUDA graph, H={H}")
            axes[1].semilogx(*zip(*graphed), "s-", label=f"H={H}, static in a CUDA graph")
        if sub and sub[0].get("static_us"):
            axes[1].semilogx(mb, [float(r["static_us"]) / float(r["raw_us"]) for r in sub],
                             "x:", label=f"H={H}, static, eager")
    axes[0].set(xlabel="dispatch bytes per rank (MB)", ylabel="time (us)",
                title="all-to-all dispatch + combine, 2 x H200")
    axes[1].axhline(1.3, color="grey", lw=0.8)
    axes[1].axvline(8, color="grey", lw=0.8, ls=":")
    axes[1].set(xlabel="dispatch bytes per rank (MB)", ylabel="time / raw NCCL",
                title="time / raw NCCL (target <= 1.3 at >= 8 MB)")
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
