"""The decode benchmark runs end to end on CPU with --tiny and writes a truthful CSV."""

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench_module():
    spec = importlib.util.spec_from_file_location(
        "bench_decode", ROOT / "benchmarks" / "e2e" / "bench_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_decode_tiny_writes_csv(tmp_path):
    bench = _bench_module()
    rc = bench.main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                     "--batches", "1,3", "--prompt-len", "8", "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "e2e_decode_cpu_tiny.csv")))
    assert [(r["batch"], r["mode"]) for r in rows] == [
        ("1", "base"), ("1", "lora8"), ("3", "base"), ("3", "lora8")]
    for r in rows:
        assert r["ok"] == "True" and float(r["check_rel_err"]) < bench.CHECK_TOL
        assert float(r["tokens_per_s"]) > 0 and r["device"] == "cpu"
    lora = rows[1]
    ratio = float(lora["tokens_per_s"]) / float(rows[0]["tokens_per_s"])
    assert abs(float(lora["ratio_vs_base"]) - ratio) < 1e-3


def test_random_adapter_targets_every_module():
    bench = _bench_module()
    from moelora_dist.config.model import ModelConfig

    cfg = ModelConfig.from_dict(dict(bench.TINY, num_hidden_layers=2))
    a = bench.random_adapter("x", cfg, 4, "cpu", seed=0)
    assert sorted(a.moe) == [0, 1] and len(a.dense) == 8 and a.max_rank == 4
    assert a.moe[0].gate.a.shape == (cfg.num_experts, 4, cfg.hidden_size)
