"""Shared pieces of the two-GPU benchmarks: groups, timing, CSV rows.

Timing follows DeepEP's ``testing.py``: every rank syncs and meets at a barrier before each
timed iteration, the iteration is timed with CUDA events on the current stream, the median over
iterations is kept, and the slowest rank's median is the result (an all-to-all is as slow as
its slowest participant).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.common import env_columns, write_csv


def bench(fn, *, warmup: int = 5, iters: int = 20, group=None, local: bool = False,
          device: str = "cuda") -> float:
    """Median seconds of ``fn()`` over ``iters``, max over the ranks of ``group`` (or world).

    ``local=True`` times this rank alone (no barrier, no reduction): for one-GPU baselines.
    ``device="cpu"``: wall-clock time on gloo CPU processes (dry runs of a GPU benchmark).
    """
    distributed = dist.is_initialized() and not local
    if device != "cuda":
        return _bench_cpu(fn, warmup, iters, group, distributed)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if distributed:
            dist.barrier(group=group)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    med = torch.tensor([statistics.median(times)], device="cuda", dtype=torch.float64)
    if distributed:
        dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)
    return float(med.item())


def _bench_cpu(fn, warmup: int, iters: int, group, distributed: bool) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if distributed:
            dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = torch.tensor([statistics.median(times)], dtype=torch.float64)
    if distributed:
        dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)
    return float(med.item())


def write_rows(path: str, rows: list[dict]) -> None:
    """The rows (each already starting with :func:`benchmarks.common.env_columns`) as CSV."""
    if rows:
        write_csv(path, rows, {k: rows[0][k] for k in env_columns()})


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def capture(fn, warmup: int = 2):
    """A CUDA graph of ``fn()`` (warmed up on a side stream first, as PyTorch asks)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
