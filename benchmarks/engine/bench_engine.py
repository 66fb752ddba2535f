"""Offline throughput of the whole engine, with 8 LoRA adapters mixed over the requests vs none.

    python -m benchmarks engine --out-dir benchmarks/results/current          # ~5 min, one H200
    python -m benchmarks engine --quick                                       # ~3 min
    python -m benchmarks engine --tiny --device cpu --out-dir /tmp/e          # CPU smoke run
    python -m benchmarks engine --model gpt-oss-20b --quick --concurrency 1,64  # ~1.5 min
    python -m benchmarks engine --fp8 --quick --concurrency 1,64 --out-dir DIR   # ~2.5 min
    torchrun --nproc-per-node 2 -m benchmarks engine --tp 2 --ep 2 --out-dir DIR  # 2 GPUs
    python -m launch --device cpu --nproc-per-node 2 -m benchmarks.engine.bench_engine \
        --tiny --device cpu --tp 2 --out-dir /tmp/e                         # gloo smoke run

Model: random bf16 weights of Qwen3-30B-A3B's shape at full depth (48 layers; H 2048, 32 q / 4
kv heads of 128, 128 experts top-8 renormalized, I 768, vocab 151936), one process. Adapters: 8
of rank 16 on q/k/v/o and every expert's gate/up/down, in a pool of 8 slots. ``--model
gpt-oss-20b``: its shape instead (24 layers alternating sliding-128 / full attention with
sinks and biases, H 2880, 64 q / 8 kv heads of 64, 32 experts top-4 with biases and the
clamped SwiGLU, I 2880, vocab 201088; bf16 experts, not MXFP4), written to
``engine_<device>_gpt-oss-20b.csv``. ``--fp8``: the Qwen3 shape with the weights an FP8
checkpoint of it (Qwen3-30B-A3B-FP8's ``quantization_config``: fine-grained e4m3, 128x128
fp32 block scales) loads as: the routed experts and q/k/v/o block-FP8, quantized from the
same seeded values (:class:`~moelora_dist.models.random_weights.RandomFP8Weights`); embeddings,
norms, router and lm_head bf16; activations and adapters bf16. Written to
``engine_fp8_<device>.csv``; every CSV has a ``weights`` column (``fp8`` or the dtype). For each
concurrency B in ``--concurrency`` (default 1, 16, 64, 256) and mode ("base": no adapter;
"lora8": request b uses adapter b % 8), B requests of ``--prompt-len`` random tokens arrive
at once and each generates ``--output-len`` tokens (greedy, EOS ignored), after an untimed
warm-up run of the same requests and length: the scheduler is deterministic, so the timed run
repeats its steps, and every Triton shape and CUDA graph it needs is compiled and captured
before (``captures`` shows it). ``--repeats N`` times the case N times after its warm-up and
writes each metric's median (the lower middle one for an even N; default 1: every repeat costs
one more run of every case, the whole timed part again). Columns:
``out_tok_s`` (output tokens over the whole run), ``prefill_tok_s`` (prompt tokens until the
last request's first token: the prefill window), ``decode_tok_s`` (tokens after it, over the
time after it), ``ttft_ms`` / ``tpot_ms`` (means over requests), ``decode_step_ms`` (median
wall time of a step after the window), their ``*_ratio`` lora8 / base. What the window is made
of: ``prefill_steps`` (steps that computed prompt tokens), ``mixed_steps`` (those of them that
also decoded some request), ``prefill_ms`` (their summed wall time) and ``prefill_step_tok_s``
(prompt tokens over it, with its ratio: the prefill rate without the time between steps);
``window_decode_steps`` / ``window_decode_ms`` (steps in it that computed no prompt token,
and their time), ``window_decode_tokens`` (tokens decoded in it, in mixed steps or not),
``window_other_ms`` (host time outside any step: adding the requests, the benchmark's loop;
the three times add up to the window); ``captures`` (CUDA graphs captured during the timed
runs: 0 unless the warm-up missed one), ``preemptions`` (by the scheduler in the timed run),
``repeats`` and ``prefill_spread`` ((max - min) / median of ``prefill_tok_s`` over them). For
the graph decode step of that B (at the final context length): ``graph_step_ms`` (GPU time of
the replayed graph), ``step_bytes`` (what it reads: :mod:`.measure`) and ``roofline`` (bytes
over the HBM bandwidth measured in this run, over the step time), ``host_over_gpu`` (the
engine's decode step wall time over the graph's GPU time); ``eager_host_ms_per_layer`` (host
time of an eager decode step per layer) and ``eager_step_ms``. On CUDA also, from 16 decode
steps under ``torch.profiler`` (:data:`PROFILED_STEPS`, once every request has 4 tokens) of
one more run of each case after all the timed ones (the profiler may leave host overhead
behind): ``kernel_ms_per_step`` (the device time of a step: its kernels, copies and
collectives summed) and ``host_over_kernels`` (``decode_step_ms`` over it), which TP layouts
have too.

Before timing, a check compares a mixed batch's first-token log-probabilities of the Triton
engine (graphs on) against the PyTorch reference path (``check_err``, max abs), and the
reference against itself with the prompts' embedding rows nudged by one bf16 rounding
(``check_floor``: how much this random model amplifies rounding); a case over both the
tolerance (``CHECK_TOL``; ``CHECK_TOL_FP8`` with ``--fp8``) and twice the floor is written with
``ok=False`` and the run exits 1.
Results: ``engine_<device>.csv`` and ``.png`` (``engine_fp8_<device>.*`` with ``--fp8``) in
``--out-dir``.

``--tp N --ep M`` (under ``torchrun`` or ``python -m launch``, ``N`` processes: one replica):
every rank builds its shard of the same model and the engine; rank 0 schedules, times the runs
and writes ``engine_<device>_tp<N>_ep<M>.csv`` (columns ``tp``, ``ep``), the others follow its
plans. The check runs on every rank (it is collective). The graph-step and eager-host columns
(``graph_step_ms``, ``roofline``, ``host_over_gpu``, ``eager_*``) replay one rank's step alone,
which a TP layout cannot (its collectives need every rank): they are left out there;
``host_over_kernels`` (over rank 0's device time, from a profiled run after the timed ones)
stands in for ``host_over_gpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from benchmarks.common import env_columns, measure_roofline
from benchmarks.engine import measure
from benchmarks.engine.report import write_outputs
from benchmarks.engine.shapes import FP8_QUANTIZATION, MODELS, random_adapter
from moelora_dist.config.model import ModelConfig
from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.engine import Engine
from moelora_dist.engine.sampling import SamplingParams
from moelora_dist.models.model import MoELoRAModel
from moelora_dist.models.random_weights import RandomFP8Weights, RandomWeights
from moelora_dist.parallel.groups import destroy_parallel, init_parallel
from moelora_dist.parallel.layout import Layout, LayoutError

log = logging.getLogger("bench_engine")
CHECK_TOL = 5e-2
# FP8: both paths quantize the same activations, but the bf16 noise between them (what the bf16
# check sees) flips an e4m3 rounding now and then, one step of up to 1/8 of a value: the flip
# bound of the CPU tests (tests/fp8_checks.py FLIP_ATOL). Unquantized activations or a wrong
# scale move every logit by far more.
CHECK_TOL_FP8 = 0.25


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="qwen3-30b-a3b",
                   help="the model shape (default qwen3-30b-a3b)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--fp8", action="store_true",
                   help="block-FP8 experts and q/k/v/o (e4m3, 128x128 fp32 scales) as an FP8 "
                        "checkpoint loads them; bf16 activations and adapters (qwen3-30b-a3b "
                        "only); files engine_fp8_<device>.*")
    p.add_argument("--quick", action="store_true",
                   help="concurrency 1,16,64 and 64 output tokens (about 3 minutes)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 48)")
    p.add_argument("--concurrency", default=None,
                   help="comma-separated sequences at once (default 1,16,64,256; tiny 1,3)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 512 (tiny 8)")
    p.add_argument("--output-len", type=int, default=None, help="default 128 (tiny 4)")
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-graph-tokens", type=int, default=EngineConfig.max_graph_tokens,
                   help="largest step replayed from a CUDA graph (default: the engine's, "
                        "%(default)s; 256 was the default before prompt-chunk graphs)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per case after its warm-up; each metric is their median "
                        "(default 1; each more costs one more run of every case)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..",
                                                     "results", "current"))
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (run under torchrun with that many processes)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks inside TP")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: must be >= 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp:
        p.error(f"--tp {args.tp} with WORLD_SIZE={world}: the benchmark times one replica; "
                f"launch {args.tp} processes (torchrun --nproc-per-node {args.tp}) or pass "
                f"--tp {world}")
    try:
        Layout(world, args.tp, args.ep)
    except LayoutError as exc:
        p.error(str(exc))
    if args.fp8 and args.model != "qwen3-30b-a3b":
        p.error(f"--fp8 serves the qwen3-30b-a3b shape only ({args.model}'s experts have no FP8 "
                "checkpoint path)")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.concurrency = [int(b) for b in (args.concurrency or (
        "1,3" if args.tiny else "1,16,64" if args.quick else "1,16,64,256")).split(",")]
    args.prompt_len = args.prompt_len or (8 if args.tiny else 512)
    args.output_len = args.output_len or (4 if args.tiny else 64 if args.quick else 128)
    return args


def build(args):
    raw = dict(MODELS[args.model][1 if args.tiny else 0][0])
    if args.layers:
        raw["num_hidden_layers"] = args.layers
    if args.fp8:  # parsed by the config as a checkpoint's config.json is
        raw["quantization_config"] = FP8_QUANTIZATION
    cfg = ModelConfig.from_dict(raw)
    groups = init_parallel(args.tp, args.ep, backend="gloo" if args.device == "cpu" else None)
    dev = groups.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    source = (RandomFP8Weights if args.fp8 else RandomWeights)(cfg, dtype, dev)
    model = MoELoRAModel.build(cfg, groups, source,
                               dtype=dtype, max_loras=args.num_adapters, max_rank=args.rank)
    # The adapters live on the host, as loaded PEFT checkpoints do (drawn on the device, then
    # moved): the page pool is sized after them with the whole device free but weights + pool.
    adapters = [random_adapter(f"a{i}", cfg, args.rank, dev, 100 + i, host=True)
                for i in tqdm(range(args.num_adapters), desc="drawing adapters")]
    top = max(args.concurrency)
    config = EngineConfig(max_num_seqs=max(top, 8),
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          max_graph_tokens=args.max_graph_tokens,
                          max_loras=args.num_adapters, max_rank=args.rank,
                          max_model_len=args.prompt_len + args.output_len + 16,
                          num_pages=None if dev.type == "cuda" else 4096)
    engine = Engine(model, config)
    for a in tqdm(adapters, desc="loading adapters"):
        engine.add_adapter(a.name, a)
    return engine


def check(engine, args) -> tuple[float, float]:
    """``(err, floor)``: the max abs difference of first-token log-probabilities (top 5) of the
    Triton engine and the PyTorch reference path, on a batch mixing adapters and base; and the
    reference's own sensitivity: the same difference between the reference and the reference
    with the prompts' embedding rows nudged by one bf16 rounding (``NUDGE``; restored bit for
    bit after). A random model that amplifies rounding (gpt-oss-20b's: two valid bf16 paths
    differ by ~0.5 after 24 layers, docs/families.md) has a large floor; a kernel bug shows as
    an ``err`` far above it. Collective: every rank runs it; the numbers are rank 0's (0.0
    elsewhere)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, engine.cfg.vocab_size, (n,), generator=g).tolist()
               for n in (args.prompt_len, 7, 19)]
    names = ["a0", None, "a1"]
    p = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, ignore_eos=True)
    def tops(outs):
        return None if outs[0] is None else [o.logprobs[0].top for o in outs]

    fast = tops(engine.generate(prompts, p, names))
    with engine.model.backend_as("torch"):
        engine.worker.graphs, graphs = None, engine.worker.graphs
        try:
            ref = tops(engine.generate(prompts, p, names))
            with nudged_rows(engine.model.embed_VH, sorted({t for q in prompts for t in q})):
                nudged = tops(engine.generate(prompts, p, names))
        finally:
            engine.worker.graphs = graphs
    if fast is None:  # a follower: rank 0 has the outputs
        return 0.0, 0.0
    return top_logprob_err(fast, ref), top_logprob_err(nudged, ref)


NUDGE = 2.0 ** -8  # one bf16 rounding, relative


@contextlib.contextmanager
def nudged_rows(table_VH: torch.Tensor, rows: list[int], seed: int = 2):
    """``table[rows] *= 1 + NUDGE * N(0, 1)`` inside the block, the exact rows back after."""
    idx = torch.tensor(rows, dtype=torch.long, device=table_VH.device)
    saved = table_VH[idx].clone()
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(saved.shape, generator=g).to(table_VH.device)
    table_VH[idx] = (saved.float() * (1 + NUDGE * noise)).to(table_VH.dtype)
    try:
        yield
    finally:
        table_VH[idx] = saved


def check_ok(err: float, floor: float, tol: float) -> bool:
    """The Triton path agrees with the reference within ``tol`` or within twice the
    reference's own disagreement with itself under a one-rounding nudge."""
    return err < max(tol, 2 * floor)


def top_logprob_err(fast_tops, ref_tops) -> float:
    """Max abs difference of two runs' top log-probabilities, per position ``[(token, lp)]``.

    A token in one run's top-k but not the other's (a near tie at the k-th place, which random
    weights over a 201k vocabulary make common) counts by how far it is above the other run's
    k-th value: the other run gives it at most that value, so the difference is at least that
    much; a token just above the cut counts nearly zero, a real disagreement counts fully."""
    err = 0.0
    for fast, ref in zip(fast_tops, ref_tops):
        for mine, other in ((dict(ref), dict(fast)), (dict(fast), dict(ref))):
            floor = min(other.values())
            for t, v in mine.items():
                err = max(err, abs(other[t] - v) if t in other else max(0.0, v - floor))
    return err


@dataclass
class StepRecord:
    """One engine step of a timed run, as the benchmark sees it from outside the engine: host
    clock at its start and end, the prompt tokens it computed (the engine's counter), the
    tokens it returned as a request's first or as a later one, the CUDA graphs it captured."""

    start: float
    end: float
    prompt_tokens: int
    first_tokens: int
    later_tokens: int
    captures: int = 0

    @property
    def wall(self) -> float:
        return self.end - self.start


@dataclass
class Trace:
    """A timed run: its start and end, every step, per request the times of its first and
    last token and its token count, and the preemptions the scheduler made meanwhile."""

    t0: float
    t_end: float
    steps: list[StepRecord]
    first: dict[str, float]
    last: dict[str, float]
    count: dict[str, int]
    preemptions: int
    kernel_ms: float | None = None  # device time per profiled decode step (timed_run)


def _num_graphs(engine) -> int:
    """CUDA graphs captured so far (none on a CPU or with ``enforce_eager``)."""
    graphs = engine.worker.graphs
    return len(graphs.captured) if graphs is not None else 0


def _step(engine, first, last, count) -> StepRecord:
    """Run one engine step and record it; ``first`` / ``last`` / ``count`` are updated."""
    prompt0, graphs0 = engine.counters["prompt_tokens"], _num_graphs(engine)
    s0 = time.perf_counter()
    outs = engine.step()
    now = time.perf_counter()
    firsts = later = 0
    for o in outs:
        k = len(o.new_token_ids)
        if not k:
            continue
        if o.request_id not in first:
            first[o.request_id] = now
            firsts, k = firsts + 1, k - 1
        later += k
        last[o.request_id] = now
        count[o.request_id] = count.get(o.request_id, 0) + len(o.new_token_ids)
    return StepRecord(s0, now, engine.counters["prompt_tokens"] - prompt0, firsts, later,
                      _num_graphs(engine) - graphs0)


def timed_run(engine, prompts, names, n, profile: int = 0) -> Trace:
    """All requests at once, each generating ``n`` tokens; every step recorded. With
    ``profile`` > 0 (CUDA), the first ``profile`` decode steps once every request has
    :data:`PROFILE_AFTER` tokens run under ``torch.profiler`` and :func:`kernel_ms_per_step`
    of them is kept in ``Trace.kernel_ms`` (None when the run is too short for it)."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    preempted = engine.scheduler.num_preemptions
    t0 = time.perf_counter()
    for i, (p, a) in enumerate(zip(prompts, names)):
        engine.add_request(f"q{i}", p, params, a)
    first, last, count, steps = {}, {}, {}, []
    prof, profiled, kernel_ms = None, 0, None
    while engine.has_unfinished():
        if (profile and prof is None and kernel_ms is None and len(count) == len(prompts)
                and min(count.values()) >= PROFILE_AFTER
                and n - max(count.values()) > profile):
            from torch.profiler import ProfilerActivity

            prof = torch.profiler.profile(activities=[ProfilerActivity.CUDA])
            prof.__enter__()
        steps.append(_step(engine, first, last, count))
        if prof is not None:
            profiled += 1
            if profiled == profile:
                torch.cuda.synchronize()
                prof.__exit__(None, None, None)
                kernel_ms = kernel_ms_per_step(prof.events(), profiled)
                prof = None
    return Trace(t0, time.perf_counter(), steps, first, last, count,
                 engine.scheduler.num_preemptions - preempted, kernel_ms)


PROFILED_STEPS = 16  # decode steps of a case's profiled run whose device time is summed
PROFILE_AFTER = 4  # tokens every request has first: the decode graphs are captured by then


def kernel_ms_per_step(events, steps: int) -> float:
    """The device time of ``steps`` engine steps from ``torch.profiler`` events: the summed
    durations of the CUDA-side ones (kernels, copies, NCCL collectives; the same count as
    ``benchmarks launches``), in ms per step. With steps in flight a window of ``steps``
    steps holds about that many steps of work (one step's kernels may fall on either side)."""
    cuda = torch.autograd.DeviceType.CUDA
    return sum(e.time_range.elapsed_us() for e in events if e.device_type == cuda) / 1e3 / steps


def window_metrics(steps: list[StepRecord], t0: float, t_first: float,
                   prompt_tokens: int) -> dict:
    """What the time until the last first token (the prefill window) is made of: the steps
    that computed prompt tokens (how many, how many of them also decoded, their summed wall
    time and the prompt tokens over it), the steps in it that computed none (decode only),
    the tokens decoded in it, and the host time outside any step (adding the requests, this
    loop). ``prefill_ms + window_decode_ms + window_other_ms`` is the whole window."""
    window = [s for s in steps if s.end <= t_first]
    pre = [s for s in window if s.prompt_tokens]
    dec = [s for s in window if not s.prompt_tokens]
    pre_s, dec_s = sum(s.wall for s in pre), sum(s.wall for s in dec)
    return dict(prefill_step_tok_s=round(prompt_tokens / max(pre_s, 1e-9), 1),
                prefill_ms=round(1e3 * pre_s, 3), prefill_steps=len(pre),
                mixed_steps=sum(1 for s in pre if s.later_tokens),
                window_decode_steps=len(dec), window_decode_ms=round(1e3 * dec_s, 3),
                window_decode_tokens=sum(s.later_tokens for s in window),
                window_other_ms=round(1e3 * (t_first - t0 - pre_s - dec_s), 3))


def case_metrics(tr: Trace, n: int, prompt_tokens: int) -> dict:
    """The CSV columns of one timed run (module docstring) from its trace."""
    B = len(tr.first)
    t_first = max(tr.first.values())
    after = sum(c - 1 for c in tr.count.values())  # tokens after each request's first
    late = sorted(s.wall for s in tr.steps if s.start >= t_first)
    first, last, count = tr.first, tr.last, tr.count
    return dict(out_tok_s=round(B * n / (tr.t_end - tr.t0), 2),
                prefill_tok_s=round(prompt_tokens / (t_first - tr.t0), 1),
                decode_tok_s=round(after / max(tr.t_end - t_first, 1e-9), 2) if n > 1 else 0.0,
                ttft_ms=round(1e3 * sum(first[k] - tr.t0 for k in first) / B, 2),
                tpot_ms=round(1e3 * sum((last[k] - first[k]) / max(count[k] - 1, 1)
                                        for k in first) / B, 3),
                decode_step_ms=round(1e3 * late[len(late) // 2], 3) if late else 0.0,
                **window_metrics(tr.steps, tr.t0, t_first, prompt_tokens),
                captures=sum(s.captures for s in tr.steps), preemptions=tr.preemptions)


def run_case(engine, prompts, names, n) -> dict:
    """All requests at once; the metrics of that run (:func:`case_metrics`)."""
    return case_metrics(timed_run(engine, prompts, names, n), n, sum(map(len, prompts)))


def median_row(runs: list[dict]) -> dict:
    """Per metric, the median over the repeats: the lower middle one of an even count, so that
    every figure was measured and counts stay integers (metrics of one row may come from
    different repeats). ``prefill_spread``: (max - min) / median of ``prefill_tok_s``."""
    row = {k: statistics.median_low([r[k] for r in runs]) for k in runs[0]}
    p = [r["prefill_tok_s"] for r in runs]
    row["prefill_spread"] = round((max(p) - min(p)) / row["prefill_tok_s"], 4)
    return row


def meta(args, engine, roof) -> dict:
    dtype = str(engine.model.dtype).removeprefix("torch.")
    return dict(**env_columns(), **roof, model=MODELS[args.model][1 if args.tiny else 0][1],
                layers=engine.cfg.num_layers, weights="fp8" if args.fp8 else dtype,
                dtype=dtype, adapters=args.num_adapters,
                rank=args.rank, pages=engine.pages.num_pages, page_size=engine.config.page_size,
                max_graph_tokens=engine.config.max_graph_tokens, tp=args.tp, ep=args.ep)


def run(args) -> list[dict]:
    engine = build(args)
    cuda = engine.model.device.type == "cuda"
    err, floor = check(engine, args)
    if not engine.is_leader:  # a TP follower: execute rank 0's plans until it is done
        engine.follow()
        return [], engine, {}
    tol = CHECK_TOL_FP8 if args.fp8 else CHECK_TOL
    ok = check_ok(err, floor, tol)
    log.info("check: first-token top-5 logprobs, Triton vs reference: max abs %.3g < max(%g, "
             "2 x %.3g, the reference vs itself nudged by one rounding) (%s)", err, tol, floor,
             "ok" if ok else "FAIL")
    roof = measure_roofline() if cuda else {}
    m = meta(args, engine, roof)
    g = torch.Generator().manual_seed(0)
    rows, profiled = [], []  # profiled: (prompts, adapters, row index) of every case
    for B in args.concurrency:
        prompts = [torch.randint(0, engine.cfg.vocab_size, (args.prompt_len,),
                                 generator=g).tolist() for _ in range(B)]
        for mode in ("base", "lora8"):
            names = [f"a{b % args.num_adapters}" if mode == "lora8" else None for b in range(B)]
            # Warm-up, untimed, of the same length: the scheduler is deterministic, so the
            # timed runs repeat its steps exactly, and every Triton shape and CUDA graph they
            # use is compiled and captured here. A shorter warm-up finishes requests earlier,
            # which moves the chunk boundaries: at 64 sequences its last prefill step was a
            # 128-token graph, the timed run's a 256-token one, captured inside the timing.
            run_case(engine, prompts, names, args.output_len)
            runs = [run_case(engine, prompts, names, args.output_len)
                    for _ in range(args.repeats)]
            row = dict(concurrency=B, mode=mode, prompt_len=args.prompt_len,
                       output_len=args.output_len, repeats=args.repeats, **median_row(runs))
            profiled.append((prompts, names, len(rows)))
            if engine.followers:  # one rank cannot replay a TP step alone (module docstring)
                rows.append(dict(row, check_err=round(err, 5), check_floor=round(floor, 5),
                                 ok=ok))
                log.info("%s", rows[-1])
                continue
            seqs, lora = measure.fake_decode(engine, B, args.prompt_len + args.output_len - 1,
                                             names)
            try:
                row.update(measure.eager_host_ms(engine, seqs, lora) if cuda else {})
                if cuda and engine.worker.graphs is not None:
                    ms, nbytes = measure.graph_replay_ms(engine, seqs, lora)
                    row.update(graph_step_ms=round(ms, 4), step_bytes=nbytes["total_bytes"],
                               roofline=round(nbytes["total_bytes"] / roof["hbm_bytes_per_s"]
                                              / (ms * 1e-3), 4),
                               host_over_gpu=round(row["decode_step_ms"] / ms, 3))
                    row.update({k: v for k, v in nbytes.items() if k != "total_bytes"})
            finally:
                measure.release(engine, seqs)
            rows.append(dict(row, check_err=round(err, 5), check_floor=round(floor, 5), ok=ok))
            log.info("%s", rows[-1])
        base, lora8 = rows[-2], rows[-1]
        for k in ("out_tok_s", "prefill_tok_s", "prefill_step_tok_s", "decode_tok_s",
                  "ttft_ms", "tpot_ms"):
            if base[k]:
                lora8[f"{k}_ratio"] = round(lora8[k] / base[k], 4)
        write_outputs(rows, m, args.out_dir)  # after each concurrency: a cut run keeps its rows
    if cuda:  # after every timed run: the profiler may leave overhead behind it
        for prompts, names, i in profiled:
            kernel_ms = timed_run(engine, prompts, names, args.output_len,
                                  profile=PROFILED_STEPS).kernel_ms
            if kernel_ms:
                rows[i].update(kernel_ms_per_step=round(kernel_ms, 4), host_over_kernels=round(
                    rows[i]["decode_step_ms"] / kernel_ms, 3))
        write_outputs(rows, m, args.out_dir)
    engine.shutdown()  # TP followers leave follow()
    return rows, engine, m


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rows, engine, m = run(args)
        if not engine.is_leader:
            return 0
        path = write_outputs(rows, m, args.out_dir)
    finally:
        destroy_parallel()
    for r in rows:
        if r["mode"] == "lora8":
            log.info("B=%-4d lora8/base: out %.3f decode %.3f prefill %.3f (its steps %.3f); "
                     "roofline %s", r["concurrency"], r.get("out_tok_s_ratio", 0),
                     r.get("decode_tok_s_ratio", 0), r.get("prefill_tok_s_ratio", 0),
                     r.get("prefill_step_tok_s_ratio", 0), r.get("roofline", "-"))
    log.info("wrote %s.csv", path)
    return 0 if rows and rows[0]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
