"""The engine benchmark runs end to end on CPU with --tiny and writes a truthful CSV (ported
from the decode benchmark's test: the old suite is replaced by this one)."""

import csv

from benchmarks.engine import bench_engine
from benchmarks.engine.shapes import TINY, random_adapter


def test_bench_engine_tiny_writes_csv(tmp_path):
    rc = bench_engine.main(["--tiny", "--device", "cpu", "--concurrency", "1,3",
                            "--output-len", "3", "--repeats", "2", "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "engine_cpu_tiny.csv")))
    assert [(r["concurrency"], r["mode"]) for r in rows] == [
        ("1", "base"), ("1", "lora8"), ("3", "base"), ("3", "lora8")]
    for r in rows:
        assert r["ok"] == "True" and float(r["check_err"]) < bench_engine.CHECK_TOL
        assert 0 < float(r["check_floor"]) < bench_engine.CHECK_TOL  # the nudge is seen
        assert float(r["out_tok_s"]) > 0 and r["device"] == "cpu"
        assert float(r["ttft_ms"]) > 0 and float(r["tpot_ms"]) > 0
        # 8-token prompts fit one step: the window is that step (and the loop around it)
        assert (r["prefill_steps"], r["mixed_steps"], r["window_decode_steps"]) == ("1", "0", "0")
        assert r["repeats"] == "2" and r["captures"] == "0" and r["preemptions"] == "0"
        assert float(r["prefill_step_tok_s"]) >= float(r["prefill_tok_s"])
    lora = rows[1]
    ratio = float(lora["out_tok_s"]) / float(rows[0]["out_tok_s"])
    assert abs(float(lora["out_tok_s_ratio"]) - ratio) < 1e-3


def test_random_adapter_targets_every_module():
    from moelora_dist.config.model import ModelConfig

    cfg = ModelConfig.from_dict(dict(TINY, num_hidden_layers=2))
    a = random_adapter("x", cfg, 4, "cpu", seed=0)
    assert sorted(a.moe) == [0, 1] and len(a.dense) == 8 and a.max_rank == 4
    assert a.moe[0].gate.a.shape == (cfg.num_experts, 4, cfg.hidden_size)


def test_bench_engine_tiny_fp8_writes_its_own_csv(tmp_path):
    """``--fp8``: the same cases on the random model with block-FP8 experts and q/k/v/o, in
    ``engine_fp8_<device>*`` (the bf16 files are left alone), a ``weights`` column saying so."""
    rc = bench_engine.main(["--tiny", "--device", "cpu", "--fp8", "--concurrency", "1,3",
                            "--output-len", "3", "--out-dir", str(tmp_path)])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["engine_fp8_cpu_tiny.csv"]
    rows = list(csv.DictReader(open(tmp_path / "engine_fp8_cpu_tiny.csv")))
    assert [(r["concurrency"], r["mode"]) for r in rows] == [
        ("1", "base"), ("1", "lora8"), ("3", "base"), ("3", "lora8")]
    for r in rows:
        assert r["weights"] == "fp8" and r["dtype"] == "float32"
        assert r["ok"] == "True" and float(r["check_err"]) < bench_engine.CHECK_TOL_FP8
        assert float(r["out_tok_s"]) > 0 and float(r["decode_tok_s"]) > 0


def test_bench_engine_fp8_model_and_its_step_bytes():
    """The --fp8 model holds block-FP8 experts and attention projections (bf16-shaped LM head,
    router, embeddings), and the decode step's bytes count their e4m3 values + fp32 scales."""
    import torch

    from benchmarks.engine import measure
    from moelora_dist.kernels.weights_fp8 import BlockFP8Weight

    args = bench_engine.parse_args(["--tiny", "--device", "cpu", "--fp8", "--num-adapters", "2",
                                    "--concurrency", "2"])
    model = bench_engine.build(args).model
    cfg = model.cfg
    moe, attn = model.layers[0]["moe"].base, model.layers[0]["attn"].w
    assert isinstance(moe.w_gate_up, BlockFP8Weight) and isinstance(moe.w_down, BlockFP8Weight)
    assert all(isinstance(attn[k], BlockFP8Weight) for k in ("q_proj", "k_proj", "v_proj",
                                                             "o_proj"))
    assert not isinstance(model.lm_head_VH, BlockFP8Weight) and cfg.fp8 is not None
    routing = [torch.tensor([[0, 1], [1, 2]]) for _ in cfg.moe_layers]  # experts 0, 1, 2
    got = measure.decode_step_bytes(model, routing, torch.tensor([-1, -1]), [5, 3])
    H, I, D, item = cfg.hidden_size, cfg.moe_intermediate, cfg.head_dim, model.dtype.itemsize
    blocks = lambda n, k: -(-n // 128) * -(-k // 128)  # noqa: E731
    # e4m3 values (1 byte) + one fp32 scale per 128 x 128 block, gate and up blocked apart
    per_expert = 3 * H * I + 4 * (2 * blocks(I, H) + blocks(H, I))
    assert got["expert_bytes"] == len(cfg.moe_layers) * 3 * per_expert
    qkv = [(cfg.num_heads * D, H), (cfg.num_kv_heads * D, H), (cfg.num_kv_heads * D, H),
           (H, cfg.num_heads * D)]
    attn_bytes = sum(n * k + 4 * blocks(n, k) for n, k in qkv)
    # lm_head and final norm; per layer the router and the two norms (q/k norms not counted)
    rest = (cfg.vocab_size * H + H + cfg.num_layers * (cfg.num_experts * H + 2 * H)) * item
    assert got["weight_bytes"] == cfg.num_layers * attn_bytes + rest


def test_check_counts_a_near_tie_at_the_cut_by_its_margin_only():
    """The engine benchmark's Triton-vs-reference check: a top-5 set that differs by a token
    tied with the 5th (gpt-oss-20b's random model on the H200 reported an infinite error
    for that) counts the margin; a token far above the other run's 5th counts fully."""
    err = bench_engine.top_logprob_err
    ref = [(1, -1.0), (2, -2.0), (3, -3.0), (4, -4.0), (5, -5.0)]
    same = [(1, -1.01), (2, -2.0), (3, -3.0), (4, -4.0), (5, -5.0)]
    tie = [(1, -1.0), (2, -2.0), (3, -3.0), (4, -4.0), (6, -5.001)]
    wrong = [(6, -0.5), (2, -2.0), (3, -3.0), (4, -4.0), (5, -5.0)]
    assert abs(err([same], [ref]) - 0.01) < 1e-9
    assert err([tie], [ref]) < 0.01
    assert err([wrong], [ref]) >= 4.0  # token 1 at -1.0 is missing from a set cut at -5.0


def test_check_floor_nudges_only_the_prompt_rows_and_restores_them_exactly():
    """The check's noise floor: the reference rerun with the prompts' embedding rows nudged by
    one bf16 rounding; the table is bit-identical afterwards and other rows never move."""
    import torch

    table = torch.randn(50, 16).to(torch.bfloat16)
    before = table.clone()
    with bench_engine.nudged_rows(table, [3, 7, 7, 40]):
        moved = (table != before).any(dim=1)
        assert moved[[3, 7, 40]].all() and moved.sum() == 3
        rel = ((table.float() - before.float()).abs() / before.float().abs().clamp(min=1e-3))
        assert rel.max() < 8 * bench_engine.NUDGE
    assert torch.equal(table, before)


def test_check_passes_within_the_tolerance_or_twice_the_floor():
    ok = bench_engine.check_ok
    assert ok(0.04, 0.0, 0.05) and not ok(0.06, 0.0, 0.05)
    assert ok(0.53, 0.4, 0.05)  # a model that amplifies rounding (gpt-oss-20b's random one)
    assert not ok(2.0, 0.4, 0.05)  # a kernel bug stands far above the floor


def _steps(*rows):
    """StepRecords from ``(start, end, prompt tokens, first tokens, later tokens)``."""
    return [bench_engine.StepRecord(*r) for r in rows]


def test_window_metrics_split_the_window_into_prefill_decode_and_host_time():
    """The window runs to the end of the step with the last first token (0.33 s): two steps
    that computed prompt tokens (one of them also decoded), a decode-only step between them,
    10 ms outside any step; the step after the window counts nowhere."""
    steps = _steps((0.01, 0.11, 100, 1, 0), (0.11, 0.13, 0, 0, 1), (0.13, 0.33, 50, 1, 1),
                   (0.33, 0.34, 0, 0, 2))
    got = bench_engine.window_metrics(steps, 0.0, 0.33, 150)
    assert (got["prefill_steps"], got["mixed_steps"], got["window_decode_steps"]) == (1 + 1, 1, 1)
    assert got["prefill_ms"] == 300.0 and got["window_decode_ms"] == 20.0
    assert got["window_decode_tokens"] == 2 and got["window_other_ms"] == 10.0
    assert got["prefill_step_tok_s"] == 500.0  # 150 tokens over 0.3 s of prefill steps


def test_case_metrics_keep_the_window_rates_and_count_captures():
    """``prefill_tok_s`` stays prompt tokens over the time to the last first token (0.4 s),
    ``prefill_step_tok_s`` over the prefill steps' 0.3 s; ``decode_step_ms`` is the median of
    the steps after the window; captures of every step add up."""
    steps = _steps((0.1, 0.4, 40, 2, 0), (0.4, 0.41, 0, 0, 2), (0.41, 0.43, 0, 0, 2),
                   (0.43, 0.46, 0, 0, 2))
    steps[1].captures = steps[3].captures = 1
    tr = bench_engine.Trace(0.0, 0.5, steps, {"a": 0.4, "b": 0.4}, {"a": 0.46, "b": 0.46},
                            {"a": 4, "b": 4}, preemptions=0)
    got = bench_engine.case_metrics(tr, 4, 40)
    assert got["prefill_tok_s"] == 100.0 and got["prefill_step_tok_s"] == round(40 / 0.3, 1)
    assert got["decode_step_ms"] == 20.0 and got["decode_tok_s"] == 60.0  # 6 tokens, 0.1 s
    assert got["captures"] == 2 and got["out_tok_s"] == 16.0
    assert got["ttft_ms"] == 400.0 and got["tpot_ms"] == 20.0


def test_median_row_takes_a_measured_middle_per_metric_and_the_spread():
    runs = [dict(prefill_tok_s=90.0, prefill_steps=5), dict(prefill_tok_s=120.0, prefill_steps=5),
            dict(prefill_tok_s=100.0, prefill_steps=6), dict(prefill_tok_s=110.0, prefill_steps=5)]
    got = bench_engine.median_row(runs)
    assert got["prefill_tok_s"] == 100.0  # the lower middle of 90, 100, 110, 120
    assert got["prefill_steps"] == 5 and got["prefill_spread"] == 0.3
    assert bench_engine.median_row(runs[:1])["prefill_spread"] == 0.0


class _StubEngine:
    """Steps that return fixed outputs and capture a graph on the second step."""

    def __init__(self, outputs):
        from types import SimpleNamespace

        self.outputs, self.counters = list(outputs), dict(prompt_tokens=0)
        self.worker = SimpleNamespace(graphs=SimpleNamespace(captured=[]))

    def step(self):
        self.counters["prompt_tokens"] += 7
        if len(self.outputs) == 1:
            self.worker.graphs.captured.append(("key",))
        return self.outputs.pop(0)


def test_a_step_record_tells_first_tokens_from_later_ones_and_sees_a_capture():
    from moelora_dist.engine.outputs import RequestOutput

    engine = _StubEngine([[RequestOutput("a", [5]), RequestOutput("b", [])],
                          [RequestOutput("a", [6]), RequestOutput("b", [7, 8])]])
    first, last, count = {}, {}, {}
    one = bench_engine._step(engine, first, last, count)
    two = bench_engine._step(engine, first, last, count)
    assert (one.prompt_tokens, one.first_tokens, one.later_tokens, one.captures) == (7, 1, 0, 0)
    assert (two.first_tokens, two.later_tokens, two.captures) == (1, 2, 1)
    assert count == {"a": 2, "b": 2} and first["b"] == last["b"] == two.end


def _tiny_engine(max_num_seqs=None):
    """The benchmark's tiny engine with a 64-token step budget, and four 40-token prompts."""
    import torch

    args = bench_engine.parse_args(["--tiny", "--device", "cpu", "--concurrency", "4",
                                    "--prompt-len", "40", "--max-num-batched-tokens", "64",
                                    "--num-adapters", "2"])
    engine = bench_engine.build(args)
    engine.config.max_num_seqs = max_num_seqs or engine.config.max_num_seqs
    g = torch.Generator().manual_seed(0)
    return engine, [torch.randint(0, engine.cfg.vocab_size, (40,), generator=g).tolist()
                    for _ in range(4)]


def _schedule(trace):
    return [(s.prompt_tokens, s.first_tokens, s.later_tokens) for s in trace.steps]


def test_the_window_of_a_chunked_prefill_on_the_engine():
    """160 prompt tokens at 64 a step: 64 (request 0 done), 16 + 40 + 7 beside request 0's
    decode, 33 beside three decodes; three prefill steps, the last two mixed, 4 decodes."""
    engine, prompts = _tiny_engine()
    got = bench_engine.run_case(engine, prompts, [None, "a0", None, "a1"], 3)
    assert (got["prefill_steps"], got["mixed_steps"], got["window_decode_steps"]) == (3, 2, 0)
    assert got["window_decode_tokens"] == 4 and got["preemptions"] == 0


def test_a_decode_only_step_inside_the_window_is_counted_apart():
    """Two sequences at most: the third prompt waits while the first two decode, so a step
    with no prompt token falls inside the window."""
    engine, prompts = _tiny_engine(max_num_seqs=2)
    trace = bench_engine.timed_run(engine, prompts, [None] * 4, 3)
    assert _schedule(trace)[:5] == [(64, 1, 0), (16, 1, 1), (0, 0, 2), (40, 1, 1), (40, 1, 1)]
    got = bench_engine.case_metrics(trace, 3, 160)
    assert (got["prefill_steps"], got["mixed_steps"], got["window_decode_steps"]) == (4, 3, 1)
    assert got["window_decode_tokens"] == 5 and got["window_decode_ms"] > 0


def test_only_a_warm_up_of_the_same_length_repeats_the_timed_schedule():
    """Why the warm-up generates as many tokens as the timed run: the scheduler repeats a run
    of the same length step for step, while a shorter one finishes requests earlier and moves
    the chunk boundaries (on the H200 at 64 sequences a 256-token graph step that the 3-token
    warm-up never captured, so its capture fell inside the timed prefill window)."""
    engine, prompts = _tiny_engine()
    names = [None, "a0", None, "a1"]
    timed = _schedule(bench_engine.timed_run(engine, prompts, names, 3))
    assert _schedule(bench_engine.timed_run(engine, prompts, names, 3)) == timed
    short = _schedule(bench_engine.timed_run(engine, prompts, names, 1))
    assert short[1] == (64, 2, 0) and timed[1] == (63, 2, 1)  # request 0 is done, or decodes


class _Event:
    def __init__(self, us, cuda=True):
        import torch

        self.device_type = (torch.autograd.DeviceType.CUDA if cuda
                            else torch.autograd.DeviceType.CPU)
        self.time_range = type("R", (), {"elapsed_us": lambda self, us=us: us})()


def test_kernel_time_per_step_sums_the_device_events():
    events = [_Event(300.0), _Event(100.0), _Event(5000.0, cuda=False), _Event(600.0)]
    assert bench_engine.kernel_ms_per_step(events, 4) == 0.25  # (300+100+600) us / 4 steps


def test_the_profiled_window_starts_once_every_request_decodes(monkeypatch):
    """``timed_run(profile=k)`` profiles k steps, first when every request has PROFILE_AFTER
    tokens and more than k still to come, and keeps their device time per step; a run too
    short for a window keeps none (the CUDA profiler replaced by a recorder, on the CPU)."""
    import torch

    seen = []

    class FakeProfile:
        def __init__(self, activities):
            self.steps0 = None

        def __enter__(self):
            self.steps0 = engine.counters["steps"]
            seen.append(("start", {k: v for k, v in counts.items()}))
            return self

        def __exit__(self, *exc):
            seen.append(("stop", engine.counters["steps"] - self.steps0))

        def events(self):
            return [_Event(1000.0)] * 3

    counts = {}
    real_step = bench_engine._step

    def step(engine, first, last, count):
        out = real_step(engine, first, last, count)
        counts.clear()
        counts.update(count)
        return out

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bench_engine, "_step", step)
    engine, prompts = _tiny_engine()
    trace = bench_engine.timed_run(engine, prompts, [None, "a0", None, "a1"], 12, profile=3)
    start, stop = seen
    assert min(start[1].values()) >= bench_engine.PROFILE_AFTER and len(start[1]) == 4
    assert stop == ("stop", 3) and trace.kernel_ms == 1.0  # 3 ms over 3 steps
    seen.clear()
    short = bench_engine.timed_run(engine, prompts, [None] * 4, 5, profile=3)
    assert short.kernel_ms is None and not seen
