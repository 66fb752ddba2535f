"""The engine benchmark's gpt-oss-20b shape (``--model gpt-oss-20b``): the tiny variant runs end
to end on CPU and writes its own truthful CSV, and the decode step's byte count reads a
sliding-window layer's window only and counts the expert biases with their experts."""

import csv

import torch

from benchmarks.engine import bench_engine, measure
from benchmarks.engine.shapes import GPT_OSS_20B, MODELS
from moelora_dist.config.model import ModelConfig


def test_gpt_oss_shape_is_the_20b_config():
    cfg = ModelConfig.from_dict(GPT_OSS_20B)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_experts, cfg.top_k) == (24, 2880, 32, 4)
    assert [cfg.window_of(i) for i in range(4)] == [128, None, 128, None]
    assert cfg.sinks and cfg.activation == "swiglu_oai" and cfg.rope.kind == "yarn"


def test_bench_engine_tiny_gpt_oss_writes_its_csv(tmp_path):
    rc = bench_engine.main(["--model", "gpt-oss-20b", "--tiny", "--device", "cpu",
                            "--concurrency", "1,3", "--output-len", "3", "--prompt-len", "9",
                            "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "engine_cpu_tiny_gpt-oss.csv")))
    assert [(r["concurrency"], r["mode"]) for r in rows] == [
        ("1", "base"), ("1", "lora8"), ("3", "base"), ("3", "lora8")]
    for r in rows:  # the Triton (interpreter) engine matched the reference path
        assert r["ok"] == "True" and float(r["check_err"]) < bench_engine.CHECK_TOL
        assert r["model"] == "tiny-gpt-oss" and float(r["out_tok_s"]) > 0


def test_decode_step_bytes_window_and_biases():
    args = bench_engine.parse_args(["--model", "gpt-oss-20b", "--tiny", "--device", "cpu",
                                    "--num-adapters", "2", "--concurrency", "2"])
    engine = bench_engine.build(args)
    model, cfg = engine.model, engine.cfg
    assert MODELS["gpt-oss-20b"][1][0]["sliding_window"] == cfg.window_of(0) == 4
    routing = [torch.tensor([[0, 1], [1, 2]]) for _ in cfg.moe_layers]  # experts 0, 1, 2
    got = measure.decode_step_bytes(model, routing, torch.tensor([-1, -1]), [10, 3])
    H, I, item = cfg.hidden_size, cfg.moe_intermediate, model.dtype.itemsize
    per_expert = (3 * H * I + 2 * I + H) * item  # gate_up, down and their biases
    assert got["expert_bytes"] == len(cfg.moe_layers) * 3 * per_expert
    kv_token = 2 * model.split.num_kv * cfg.head_dim * item
    # layer 0 slides over 4 keys: min(10, 4) + min(3, 4); layer 1 reads all 13
    assert got["kv_bytes"] == kv_token * (7 + 13)
    assert got["lora_bytes"] == 0  # no slot used
