"""The engine benchmark runs end to end on CPU with --tiny and writes a truthful CSV (ported
from the decode benchmark's test: the old suite is replaced by this one)."""

import csv

from benchmarks.engine import bench_engine
from benchmarks.engine.shapes import TINY, random_adapter


def test_bench_engine_tiny_writes_csv(tmp_path):
    rc = bench_engine.main(["--tiny", "--device", "cpu", "--concurrency", "1,3",
                            "--output-len", "3", "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "engine_cpu_tiny.csv")))
    assert [(r["concurrency"], r["mode"]) for r in rows] == [
        ("1", "base"), ("1", "lora8"), ("3", "base"), ("3", "lora8")]
    for r in rows:
        assert r["ok"] == "True" and float(r["check_err"]) < bench_engine.CHECK_TOL
        assert 0 < float(r["check_floor"]) < bench_engine.CHECK_TOL  # the nudge is seen
        assert float(r["out_tok_s"]) > 0 and r["device"] == "cpu"
        assert float(r["ttft_ms"]) > 0 and float(r["tpot_ms"]) > 0
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
