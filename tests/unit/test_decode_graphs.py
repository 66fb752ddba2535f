"""The padded static decode step of models/graphs.py, run uncaptured on CPU, against eager decode.

Tiny Qwen3-MoE-shaped model with random fp32 weights (2 layers, 8 experts, top-2), adapters
of rank 4 and 8 on q/k/v/o and every expert, scaled up so that a LoRA delta moves the logits
far more than the tolerance (a static step that dropped or misrouted an adapter would fail).
fp32 on CPU: both paths run the same ops on the same values except attention, which reads the
whole cache length with a mask instead of the exact length; atol 1e-4 on logits of size ~1.
"""

import pytest
import torch

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA
from moelora_dist.lora.batch_info import build_batch_info
from moelora_dist.models.batch import ForwardBatch
from moelora_dist.config.model import ModelConfig
from moelora_dist.models.graphs import DecodeGraphs, bucket_for, capacity_for
from moelora_dist.models.model import MoELoRAModel
from moelora_dist.models.requests import Request
from moelora_dist.models.runner import ModelRunner
from moelora_dist.models.weights import RandomWeights
from moelora_dist.parallel.groups import ParallelGroups

TINY = dict(model_type="qwen3_moe", vocab_size=128, hidden_size=32, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=16, intermediate_size=48, norm_topk_prob=True,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
            max_position_embeddings=256, num_hidden_layers=2)
ATOL = 1e-4


def _adapter(name, cfg, rank, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
    E, H, I, D = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate, cfg.head_dim
    f = lambda o, i, e=1: LoRAFactors(rn(e, rank, i), rn(e, o, rank), 1.0)  # noqa: E731
    dense = {}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}.self_attn"
        for m, o, i in (("q_proj", cfg.num_heads * D, H), ("k_proj", cfg.num_kv_heads * D, H),
                        ("v_proj", cfg.num_kv_heads * D, H), ("o_proj", H, cfg.num_heads * D)):
            dense[f"{p}.{m}"] = f(o, i)
    moe = {layer: MoELayerLoRA(E, f(I, H, E), f(I, H, E), f(H, I, E))
           for layer in range(cfg.num_layers)}
    return CanonicalAdapter(name, moe=moe, dense=dense, format="random")


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.from_dict(TINY)
    m = MoELoRAModel.build(cfg, ParallelGroups.single("cpu"), RandomWeights(cfg, torch.float32,
                           "cpu", seed=0, std=0.1), dtype=torch.float32, max_loras=3,
                           max_rank=8, progress=False)
    m.pool.load(_adapter("a0", cfg, 4, seed=1))
    m.pool.load(_adapter("a1", cfg, 8, seed=2))
    return m


def _prefill(model, cache, prompts):
    lens = [len(p) for p in prompts]
    batch = ForwardBatch.build(lens, [0] * len(lens), "cpu", cache_rows=list(range(len(lens))))
    ids = torch.tensor([t for p in prompts for t in p])
    info = build_batch_info(batch.seg_indptr_B1, torch.full((len(lens),), -1),
                              model.pool.slot_rank_S)
    model.forward(ids, batch, cache, info)


def _eager_step(model, cache, rows, ids, positions, slots):
    batch = ForwardBatch.build([1] * len(rows), positions, "cpu", cache_rows=rows)
    info = build_batch_info(batch.seg_indptr_B1, torch.tensor(slots, dtype=torch.int32),
                              model.pool.slot_rank_S)
    return model.logits(model.forward(torch.tensor(ids), batch, cache, info))


def _run_both(model, prompts, names, steps, finished_at=None):
    """Decode ``steps`` tokens with the static step and eagerly on one cache; compare logits.

    ``finished_at``: (step, row) after which that row leaves the batch (a gap of padding).
    Returns the static logits of the first step.
    """
    slot = {n: model.pool.slot_of(n) for n in names if n}
    slots = [slot[n] if n else -1 for n in names]
    graphs = DecodeGraphs(model, capture=False)
    cache = graphs.cache_for(len(prompts), 64)
    _prefill(model, cache, prompts)
    ids = [p[-1] for p in prompts]
    pos = [len(p) - 1 for p in prompts]
    live = list(range(len(prompts)))
    first = None
    for step in range(steps):
        if finished_at and step == finished_at[0]:
            live.remove(finished_at[1])
        n = live[-1] + 1
        got, _ = graphs.step([ids[j] if j in live else 0 for j in range(n)],
                             [pos[j] if j in live else -1 for j in range(n)],
                             [slots[j] for j in range(n)])
        got = got.clone()
        want = _eager_step(model, cache, live, [ids[j] for j in live], [pos[j] for j in live],
                           [slots[j] for j in live])
        torch.testing.assert_close(got[live], want, atol=ATOL, rtol=0)
        assert torch.isfinite(got).all()
        first = got if first is None else first
        for j, tok in zip(live, want.argmax(-1).tolist()):
            ids[j], pos[j] = tok, pos[j] + 1
    return first


@pytest.mark.parametrize("prompts,names,finished_at", [
    # B = 3 is no bucket (padded to 4); different prompt lengths; row 1 finishes mid-way
    ([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16]], ["a0", None, "a1"], (2, 1)),
    ([[3, 1, 4], [1, 5, 9, 2, 6], [5, 3], [5], [8, 9, 7]], [None] * 5, None),  # all base, B=5
    ([[7, 7, 7, 7]], ["a1"], None),  # one request, bucket 1
    ([[2] * 3, [4] * 6, [6] * 2, [8] * 7, [10], [12] * 4], ["a1", "a0", "a0", None, "a1", None],
     (1, 3)),  # mixed B=6, a base row in the middle finishes
], ids=["mixed_B3_gap", "all_base_B5", "single", "mixed_B6_gap"])
def test_static_step_matches_eager(model, prompts, names, finished_at):
    _run_both(model, prompts, names, steps=4, finished_at=finished_at)


def test_adapters_change_the_logits(model):
    """Guards the tests above: with these weights an adapter moves logits by >> ATOL."""
    prompts = [[1, 2, 3], [1, 2, 3]]
    out = _run_both(model, prompts, ["a0", None], steps=1)
    assert (out[0] - out[1]).abs().max() > 100 * ATOL


def test_adapter_replaced_in_its_slot(model):
    """Unload a0, load a different adapter under the same name into the same slot: the static
    step serves the new weights, and the pool's buffers keep their storage (a captured graph
    holds their addresses; the LoRA kernels read them directly)."""
    prompts, names = [[1, 2, 3, 4], [5, 6], [7]], ["a0", "a1", None]
    before = _run_both(model, prompts, names, steps=1)
    ptrs = {k: t.data_ptr() for k, t in model.pool._all_tensors().items()}
    slot = model.pool.slot_of("a0")
    model.pool.unload("a0")
    model.pool.load(_adapter("a0", model.cfg, 4, seed=99))
    try:
        assert model.pool.slot_of("a0") == slot
        after = _run_both(model, prompts, names, steps=3)
        assert (after[0] - before[0]).abs().max() > 100 * ATOL  # the new a0 is served
        torch.testing.assert_close(after[1:], before[1:], atol=ATOL, rtol=0)
        assert {k: t.data_ptr() for k, t in model.pool._all_tensors().items()} == ptrs
    finally:
        model.pool.unload("a0")
        model.pool.load(_adapter("a0", model.cfg, 4, seed=1))


def test_generate_static_equals_eager(model):
    runner = ModelRunner(model)
    runner.add_adapter("a0", _adapter("a0", model.cfg, 4, seed=1))  # already in the pool
    runner.add_adapter("a1", _adapter("a1", model.cfg, 8, seed=2))
    reqs = [Request([1, 2, 3], "a0", max_new_tokens=5), Request([4, 5], None, max_new_tokens=2),
            Request([6, 7, 8, 9], "a1", max_new_tokens=6), Request([3], "a1", max_new_tokens=1),
            Request([2, 2], None, max_new_tokens=4)]
    eager = runner.generate(reqs, cuda_graphs=False)
    runner.decode_graphs = DecodeGraphs(model, capture=False)
    static = runner.generate(reqs)
    assert [g.output_ids for g in static] == [g.output_ids for g in eager]
    assert [len(g.output_ids) for g in static] == [5, 2, 6, 1, 4]


def test_static_decode_mask_matches_build():
    pos = torch.tensor([3, 0, 6])
    static = ForwardBatch.static_decode(pos, 8, sliding_window=3)
    built = ForwardBatch.build([1, 1, 1], [3, 0, 6], "cpu", sliding_window=3)
    L = built.max_kv
    assert torch.equal(static.attn_mask_B1QL[..., :L], built.attn_mask_B1QL)
    assert not static.attn_mask_B1QL[..., L:].any()


def test_buckets_cache_reuse_and_errors(model):
    assert [bucket_for(n) for n in (1, 3, 64, 65, 256, 257)] == [1, 4, 64, 128, 256, None]
    assert [capacity_for(n) for n in (1, 64, 65, 300)] == [64, 64, 128, 512]
    graphs = DecodeGraphs(model, capture=False)
    with pytest.raises(ValueError, match="cache_for"):
        graphs.step([1], [0], [-1])
    c = graphs.cache_for(3, 40)
    assert (c.num_rows, c.max_len) == (4, 64) and graphs.cache_for(2, 50) is c
    assert graphs.cache_for(5, 50) is not c  # more rows: a new cache (graphs dropped)
    with pytest.raises(ValueError, match="largest decode graph bucket"):
        graphs.cache_for(300, 10)
    with pytest.raises(ValueError, match="at most 8 rows"):
        graphs.step([1] * 9, [0] * 9, [-1] * 9)
    with pytest.raises(ValueError, match="KV cache length"):
        graphs.step([1], [64], [-1])
    with pytest.raises(ValueError, match="slots must lie"):
        graphs.step([1], [3], [3])  # the pool has 3 slots
    with pytest.raises(ValueError, match="token ids"):
        graphs.step([128], [3], [-1])  # vocab 128
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(model, capture=True)


def test_bench_decode_static_rows(tmp_path):
    """bench_decode --graphs static: the bench's graph code path (uncaptured) runs, its check
    (static step against eager, base and mixed) passes, and both kinds of rows are written."""
    import csv
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "e2e" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode_static", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--tiny", "--device", "cpu", "--graphs", "static", "--steps", "2",
                     "--warmup", "1", "--batches", "3", "--prompt-len", "6",
                     "--out-dir", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "e2e_decode_cpu_tiny.csv")))
    assert rc == 0 and all(r["ok"] == "True" for r in rows)
    assert [(r["decode"], r["mode"]) for r in rows] == [
        ("static", "base"), ("static", "lora8"), ("eager", "base"), ("eager", "lora8")]
