"""The padded static steps of engine/graphs.py, run uncaptured on a CPU, against eager steps.

Tiny Qwen3-MoE-shaped model with random fp32 weights (2 layers, 8 experts, top-2), adapters of
rank 4 and 8 on q/k/v/o and every expert, scaled so that an adapter moves the logits far more
than the tolerance (a static step that dropped or misrouted an adapter would fail). Both
engines run the same requests greedily with log-probabilities; the static one pads each step
to its bucket (padding tokens store no key, padding sequences have no keys) and reads the
block tables from its static buffers. fp32 on CPU: the same ops on the same values except the
padding rows, so log-probabilities agree to 1e-4 and tokens exactly.
"""

import pytest
import torch

from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.engine import Engine
from moelora_dist.engine.graphs import GraphRunner
from moelora_dist.engine.sampling import SamplingParams
from tests.engine_cases import adapter, drive, tiny_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def engines(model, **kw):
    """(static, eager) engines over one model (each its own pages), both adapters added."""
    out = []
    for eager in (False, True):
        cfg = EngineConfig(**{**dict(max_loras=3, max_rank=8, page_size=4, num_pages=48,
                                     max_graph_tokens=16, enforce_eager=eager), **kw})
        e = Engine(model, cfg, capture=False if not eager else None)
        for name, (rank, seed) in {"a0": (4, 1), "a1": (8, 2)}.items():
            if model.pool.slot_of(name) is not None:
                model.pool.release_batch()
                model.pool.unload(name)
            e.add_adapter(name, adapter(name, model.cfg, rank, seed))
        out.append(e)
    return out


def run(engine, prompts, names, arrivals=None, max_tokens=6):
    """Greedy with 5 logprobs; ``arrivals[i]``: the step at which request i is added."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=5,
                            ignore_eos=True)
    done = drive(engine, prompts, names, params, arrivals)
    return [done[i][:2] for i in range(len(prompts))]


CASES = {
    # B = 3 pads to 4; different prompt lengths
    "mixed_B3": ([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16]],
                 ["a0", None, "a1"], None),
    "all_base_B5": ([[3, 1, 4], [1, 5, 9, 2, 6], [5, 3], [5], [8, 9, 7]], [None] * 5, None),
    "single": ([[7, 7, 7, 7]], ["a1"], None),
    # arrivals while others decode: small mixed steps (prefill + decode <= 16 tokens) replay
    # the mixed graphs; the 20-token prompt is larger than a graph, so its steps run eagerly
    "arrivals": ([[2] * 3, [4] * 6, [6] * 2, list(range(20)), [10], [12] * 4],
                 ["a1", "a0", "a0", None, "a1", None], [0, 1, 1, 2, 4, 5]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_static_steps_match_eager(model, name):
    prompts, names, arrivals = CASES[name]
    static, eager = engines(model)
    got, want = run(static, prompts, names, arrivals), run(eager, prompts, names, arrivals)
    for (g_ids, g_lp), (w_ids, w_lp) in zip(got, want):
        assert g_ids == w_ids
        torch.testing.assert_close(torch.tensor(g_lp), torch.tensor(w_lp), atol=ATOL, rtol=0)
    assert static.counters["graph_steps"] > 0 and eager.counters["graph_steps"] == 0
    assert static.worker.graphs.captured == [] and static.pages.num_used == 0


def test_adapters_change_the_outputs(model):
    """Guards the tests above: with these weights an adapter moves log-probs by >> ATOL."""
    static, _ = engines(model)
    (_, lp_a), (_, lp_b) = run(static, [[1, 2, 3], [1, 2, 3]], ["a0", None], max_tokens=1)
    assert abs(lp_a[0] - lp_b[0]) > 100 * ATOL


def test_adapter_replaced_in_its_slot(model):
    """Remove a0, add a different adapter under the same name: the static steps serve the new
    weights in the same slot, and the pool's buffers keep their storage (a captured graph
    holds their addresses; the LoRA kernels read them directly)."""
    static, _ = engines(model)
    prompts, names = [[1, 2, 3, 4], [5, 6], [7]], ["a0", "a1", None]
    before = run(static, prompts, names)
    ptrs = {k: t.data_ptr() for k, t in model.pool._all_tensors().items()}
    slot = model.pool.slot_of("a0")
    static.remove_adapter("a0")
    static.add_adapter("a0", adapter("a0", model.cfg, 4, seed=99))
    after = run(static, prompts, names)
    assert model.pool.slot_of("a0") == slot
    assert abs(after[0][1][0] - before[0][1][0]) > 100 * ATOL  # the new a0 is served
    assert after[1:] == before[1:]
    assert {k: t.data_ptr() for k, t in model.pool._all_tensors().items()} == ptrs


def test_buckets_and_refusals(model):
    static, eager = engines(model)
    g = static.worker.graphs
    assert [g.bucket_for(n) for n in (1, 3, 16, 17)] == [1, 4, 16, 0]
    assert eager.worker.graphs is None
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphRunner(model, static.cache, static.config, 64, True, capture=True)


def test_step_counters_tell_decode_only_steps_from_prompt_steps(model):
    """``decode_steps`` counts the steps with no prompt chunk, ``step_seconds`` grows with every
    step (the serving benchmark compares both sides with them): one request of a 5-token
    prompt making 4 tokens takes 1 prompt step + 3 decode steps; a second arrival at step 2
    adds one mixed (prompt + decode) step. (Steps read back one by one: with ``async_steps``
    the arrival at step 2 meets the engine a step further on.)"""
    static, _ = engines(model, async_steps=False)
    run(static, [[1, 2, 3, 4, 5]], ["a0"], max_tokens=4)
    c = dict(static.counters)
    assert (c["steps"], c["decode_steps"]) == (4, 3) and c["step_seconds"] > 0
    run(static, [[1, 2, 3], [4, 5]], [None, "a1"], arrivals=[0, 2], max_tokens=4)
    m = static.metrics()
    assert m.steps - c["steps"] == 6 and m.decode_steps - c["decode_steps"] == 4
    assert m.step_seconds > c["step_seconds"]


def test_prompt_chunk_graphs_hold_fewer_sequences_than_tokens(model):
    """Graphs of prompt chunks: with ``max_num_seqs`` 2 a 32-token graph holds 3 sequences
    (``EngineConfig.graph_seqs``), so a 20-token prompt pads to 32 tokens whose 12 padding
    tokens sit in two padding sequences of 1 and 11 tokens (no keys, no adapter). Every step
    of these requests, prompts of 20 and 27 tokens with adapters and without, replays a
    static step, and the tokens and log-probabilities equal the eager engine's."""
    static, eager = engines(model, max_num_seqs=2, max_graph_tokens=32)
    g = static.worker.graphs
    assert [g.seqs_for(P) for P in (1, 2, 4, 16, 32)] == [1, 2, 3, 3, 3]
    prompts = [list(range(3, 23)), list(range(40, 67)), [5, 6, 7]]
    names, arrivals = ["a1", None, "a0"], [0, 1, 3]
    got, want = run(static, prompts, names, arrivals), run(eager, prompts, names, arrivals)
    for (g_ids, g_lp), (w_ids, w_lp) in zip(got, want):
        assert g_ids == w_ids
        torch.testing.assert_close(torch.tensor(g_lp), torch.tensor(w_lp), atol=ATOL, rtol=0)
    c = static.counters
    assert c["graph_steps"] == c["steps"] and c["steps"] > c["decode_steps"]
    assert static.pages.num_used == 0


def test_plan_pads_a_prompt_chunk_into_one_padding_sequence():
    """build_plan's padding of a graph of P tokens and Q < P sequences: the padding tokens go
    one per padding sequence, the last takes the rest; a step that leaves no padding sequence
    for its padding tokens is refused."""
    from moelora_dist.engine.plan import build_plan
    from moelora_dist.engine.sequence import Sequence

    seqs = [Sequence("r0", 0, list(range(7)), SamplingParams(max_tokens=1), None, 0),
            Sequence("r1", 1, list(range(5)), SamplingParams(max_tokens=1), None, 0)]
    plan = build_plan(seqs, [7, 5], [[0, 1], [2, 3]], [1, -1], 4, "cpu", graph_bucket=16,
                      graph_seqs=4)
    assert (plan.num_tokens, plan.num_seqs) == (16, 4) and not plan.decode_only
    assert plan.seg_indptr_B1.tolist() == [0, 7, 12, 13, 16]
    assert plan.kv_lens_B.tolist() == [7, 5, 0, 0]
    assert plan.lora_slot_B.tolist() == [1, -1, -1, -1]
    assert plan.slot_mapping_T[12:].tolist() == [-1] * 4
    assert build_plan(seqs, [7, 5], [[0, 1], [2, 3]], [1, -1], 4, "cpu", graph_bucket=16,
                      graph_seqs=3).seg_indptr_B1.tolist() == [0, 7, 12, 16]
    with pytest.raises(ValueError, match="does not fit a graph of 16 tokens and 2 sequences"):
        build_plan(seqs, [7, 5], [[0, 1], [2, 3]], [1, -1], 4, "cpu", graph_bucket=16,
                   graph_seqs=2)
