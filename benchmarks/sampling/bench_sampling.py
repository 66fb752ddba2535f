"""Cost of ``sample()`` at Qwen3's vocabulary (V = 151,936, bf16 logits), per batch size and
sampling mode, eager and replayed in a CUDA graph, next to the PyTorch way (Hugging Face's
warpers + ``torch.multinomial``) and to the HBM time of reading the logits once:

    PYTHONPATH=$PWD python3 -m benchmarks sampling --out benchmarks/results/current [--quick]
    PYTHONPATH=$PWD python3 -m benchmarks sampling --device cpu --vocab 4096 --quick  # smoke

Each case first checks the Triton tokens against the PyTorch path on the same logits (they
may differ only at fp32 near-ties: ``ok`` is False past 1% of rows, and then no time is
reported). Writes ``sampling_<device>.csv`` (environment columns and the roofline measured in
the run first). About 1 minute on an H200.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from tqdm import tqdm

from benchmarks.common import device_tag, env_columns, measure_roofline, write_csv
from moelora_dist.engine.sampling import SamplingBatch, SamplingParams, sample

MODES = {  # name -> (params, top-n logprobs)
    "greedy": (SamplingParams(temperature=0.0), 0),
    "temperature": (SamplingParams(temperature=0.8), 0),
    "min_p": (SamplingParams(temperature=0.8, min_p=0.05), 0),
    "top_k": (SamplingParams(temperature=0.8, top_k=50), 0),
    "top_p": (SamplingParams(temperature=0.8, top_p=0.9), 0),
    "top_k+top_p+min_p": (SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05), 0),
    "temperature+logprobs20": (SamplingParams(temperature=0.8), 20),
}
QUICK_MODES = ("greedy", "temperature", "top_p", "temperature+logprobs20")


def _time_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_way(logits_BV: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What a PyTorch user writes (Hugging Face's warpers, then multinomial): the baseline."""
    if p.greedy:
        return logits_BV.argmax(-1)
    s = logits_BV.float() / p.temperature
    if p.top_k > 0:
        s = s.masked_fill(s < torch.topk(s, p.top_k).values[:, -1:], float("-inf"))
    if p.top_p < 1:
        sorted_s, order = torch.sort(s, descending=False)
        remove = sorted_s.softmax(-1).cumsum(-1) <= 1 - p.top_p
        remove[:, -1] = False
        s = s.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    if p.min_p > 0:
        probs = s.softmax(-1)
        s = s.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return torch.multinomial(s.softmax(-1), 1).squeeze(1)


def _graph_ms(logits, batch, num_logprobs) -> float:
    static = SamplingBatch.empty(batch.num_rows, "cuda", filter_width=batch.filter_width,
                                 all_greedy=batch.all_greedy)
    batch.copy_into(static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            sample(logits, static, num_logprobs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sample(logits, static, num_logprobs)
    ms = _time_ms(graph.replay, "cuda")
    del graph
    return ms


def bench(args) -> list[dict]:
    dev, V = args.device, args.vocab
    roof = measure_roofline() if dev == "cuda" else {}
    modes = QUICK_MODES if args.quick else tuple(MODES)
    cases = [(B, m) for B in args.batch for m in modes]
    rows = []
    for B, mode in tqdm(cases, desc="sampling", unit="case"):
        params, n = MODES[mode]
        g = torch.Generator(device=dev).manual_seed(B)
        logits = (torch.randn(B, V, device=dev, generator=g) * 3).to(torch.bfloat16)
        batch = SamplingBatch.from_params([params] * B, list(range(B)), [0] * B, dev)
        backend = "triton" if dev == "cuda" else "torch"
        got = sample(logits, batch, n, backend=backend).token_ids_B
        want = sample(logits, batch, n, backend="torch").token_ids_B
        mismatches = int((got != want).sum())
        ok = mismatches <= max(1, B // 100)
        row = dict(batch=B, vocab=V, mode=mode, num_logprobs=n,
                   filter_width=min(batch.filter_width, V), ok=ok, mismatches=mismatches)
        if ok:
            eager = _time_ms(lambda: sample(logits, batch, n, backend=backend), dev)
            base = _time_ms(lambda: torch_way(logits, params), dev)
            row.update(eager_us=round(eager * 1e3, 1), torch_way_us=round(base * 1e3, 1))
            if dev == "cuda":
                graph = _graph_ms(logits, batch, n)
                read_us = B * V * logits.element_size() / roof["hbm_bytes_per_s"] * 2e6
                row.update(graph_us=round(graph * 1e3, 1),
                           speedup_vs_torch_way=round(base / graph, 2),
                           logits_read_once_us=round(read_us, 1))
        rows.append(row)
    return rows, roof


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--quick", action="store_true", help="four modes instead of seven")
    p.add_argument("--out", default="benchmarks/results/current")
    args = p.parse_args(argv)
    rows, roof = bench(args)
    meta = env_columns()
    path = os.path.join(args.out, f"sampling_{device_tag(meta)}.csv")
    write_csv(path, rows, {**meta, **roof})
    for r in rows:
        print(r)
    print(f"wrote {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
