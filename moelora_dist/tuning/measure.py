"""Checking a candidate against the reference, then timing it.

Every candidate first runs eagerly; its output must be finite, match the reference rows (a
sample of tokens, exact for any batch: ``problems.Reference``) and match the default config's
whole output (rows outside the sample). Only then is it timed: a CUDA graph of the call is
captured and its replay timed by ``triton.testing.do_bench`` (median; the L2 is flushed between
replays, so a decode-sized layer is not timed from the cache). The base layer's gate_up and
down kernels are timed apart (:class:`BaseStages`), so their tile lists add up instead of
multiplying; winners are then timed as a whole layer.
"""

from __future__ import annotations

import time

import torch

from moelora_dist.kernels.align.ops import align_items
from moelora_dist.kernels.moe_gemm import ops
from moelora_dist.kernels.moe_lora.configs import MoEConfig
from moelora_dist.kernels.moe_lora.ops import fused_moe_lora, gemm_input
from moelora_dist.kernels.weights_fp8 import is_fp8
from moelora_dist.tuning.problems import Reference

# bf16 stores h and the per-pair outputs and the LoRA expand runs in tf32: a few bf16 ulps of
# the output's magnitude (tests/gpu use the same bound). FP8 experts keep it: the kernels and
# the reference quantize the same activations in the same groups (per token and 128 columns,
# whatever the tiles), so they differ by the same roundings, plus now and then one e4m3
# rounding flipped by a last-bit difference of a bf16 activation (one step of one value of a
# 128-column group, which moves an output by far less than 2e-2 of the largest);
# tests/gpu/test_fp8_gpu.py holds FP8 layers to the same bound. A kernel that applies a wrong
# scale block misses by far more (tests/unit/test_tuning_fp8.py injects one and sees it caught).
TOLERANCE = 2e-2


def run_layer(inp: dict, cfg: MoEConfig) -> torch.Tensor:
    return fused_moe_lora(**inp, config=cfg)


def check(y_TH: torch.Tensor, ref: Reference, default_y_TH: torch.Tensor | None = None,
          tolerance: float = TOLERANCE) -> str | None:
    """None when ``y_TH`` is right, else why not (one line)."""
    if not bool(torch.isfinite(y_TH).all()):
        return "non-finite output"
    err = ref.error(y_TH)
    if err > tolerance:
        return f"differs from the reference by {err:.3g} x max|ref| on the sampled rows"
    if default_y_TH is not None:
        d = float((y_TH.float() - default_y_TH.float()).abs().max()) / ref.scale
        if d > tolerance:
            return f"differs from the default config by {d:.3g} x max|ref| (unsampled rows)"
    return None


class GraphTimer:
    """Median ms of a CUDA-graph replay of ``fn`` (``triton.testing.do_bench``): no Python
    launch cost, as the serving loop runs decode. ``rep_ms`` grows with the expected time so
    that a slow call still gets several replays."""

    def __init__(self, min_rep_ms: float = 5.0, max_rep_ms: float = 150.0):
        self.min_rep_ms, self.max_rep_ms = min_rep_ms, max_rep_ms

    def __call__(self, fn, est_ms: float | None = None) -> float:
        import triton

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # compiled already (the check ran it); this warms the allocator's pool
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        rep = min(self.max_rep_ms, max(self.min_rep_ms, 10 * (est_ms or 0.0)))
        try:
            return float(triton.testing.do_bench(graph.replay, warmup=1, rep=rep,
                                                 return_mode="median"))
        finally:
            graph.reset()


class WallTimer:
    """Wall-clock ms of one eager call: only for exercising the tuner on a CPU (the Triton
    interpreter); the numbers say nothing about a GPU."""

    def __call__(self, fn, est_ms: float | None = None) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


class BaseStages:
    """The base layer's gate_up and down launches for one ``block_m``, as
    ``fused_moe_lora`` issues them without LoRA, on one alignment (computed once)."""

    def __init__(self, inp: dict, block_m: int):
        self.inp = inp
        ids = inp["topk_ids_TK"]
        self.E = inp["w_gate_up_EXH"].shape[0]
        self.K = ids.shape[1]
        self.al = align_items(ids, None, None, None, None, num_experts=self.E,
                              block_m=block_m, mode="base")
        self._h = None
        self._q: dict = {}

    def _input(self, cfg: MoEConfig, a: torch.Tensor, w, scale_kw: str):
        """The GEMM's activation as ``fused_moe_lora`` hands it over under ``cfg``: with FP8
        weights and ``fp8_prequant``, quantized (once per stage object: the quantize kernel
        costs every tile candidate the same, so only the GEMM is timed)."""
        key = (scale_kw, is_fp8(w) and cfg.fp8_prequant)
        if key not in self._q:
            self._q[key] = gemm_input(cfg, a, w, scale_kw)
        return self._q[key]

    def gate_up(self, cfg: MoEConfig):
        inp = self.inp
        x, kw = self._input(cfg, inp["x_TH"], inp["w_gate_up_EXH"], "x_scale")
        return lambda: ops.gate_up(x, inp["w_gate_up_EXH"], self.al, self.K,
                                   activation="silu", block_n=cfg.block_n,
                                   block_k=cfg.block_k, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages, group_m=cfg.group_m,
                                   out_dtype=inp["x_TH"].dtype,
                                   **kw)

    def down(self, cfg: MoEConfig, h_from: MoEConfig):
        if self._h is None:  # down's input: any gate_up tiles give the same h
            self._h = self.gate_up(h_from)()
        inp = self.inp
        h, kw = self._input(cfg, self._h, inp["w_down_EHI"], "h_scale")
        return lambda: ops.down(h, inp["w_down_EHI"], inp["topk_weights_TK"], self.al,
                                self.K, out_dtype=self._h.dtype, **cfg.down_tiles(), **kw)
