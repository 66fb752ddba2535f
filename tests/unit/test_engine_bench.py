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
