"""The engine on one GPU in bf16: CUDA-graph steps against eager steps, adapters swapped under
captured graphs, a poisoned slot kept to itself, the page pool sized from free memory, and the
dense-LoRA kernels at real sizes.

Run with the device tool: ``PYTHONPATH=$PWD python3 -m pytest tests/gpu -m gpu -q``.
Model: random bf16 weights, 2 layers, H 512, 8 q / 2 kv heads of 64, 32 experts top-4, I 256
(Triton MoE, paged-attention and norm kernels), 3 adapter slots of rank 8 and 16.

Tolerance: a graph step runs the padded batch (T = bucket), so GEMM tilings may differ from
eager; both round activations to bf16 (0.4 % relative) at every layer. Token-for-token
equality is asserted where no row is padded (B is a bucket); elsewhere log-probabilities agree
within 5e-2 (a few bf16 ulps of logits of size ~10), and an adapter moves them far more.
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = dict(model_type="qwen3_moe", vocab_size=4096, hidden_size=512, num_attention_heads=8,
              num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
              moe_intermediate_size=256, intermediate_size=1024, norm_topk_prob=True,
              rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
              max_position_embeddings=4096, num_hidden_layers=2)
LP_TOL = 5e-2


def _adapter(name, cfg, rank, seed):
    from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA

    g = torch.Generator(device="cuda").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device="cuda") * 0.1  # noqa: E731
    E, H, I, D = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate, cfg.head_dim
    f = lambda o, i, e=1: LoRAFactors(rn(e, rank, i), rn(e, o, rank), 2.0)  # noqa: E731
    dense = {}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}.self_attn"
        dense[f"{p}.q_proj"] = f(cfg.num_heads * D, H)
        dense[f"{p}.v_proj"] = f(cfg.num_kv_heads * D, H)
        dense[f"{p}.o_proj"] = f(H, cfg.num_heads * D)
    moe = {layer: MoELayerLoRA(E, f(I, H, E), f(I, H, E), f(H, I, E))
           for layer in range(cfg.num_layers)}
    return CanonicalAdapter(name, moe=moe, dense=dense, format="random")


@pytest.fixture(scope="module")
def model():
    from moelora_dist.config.model import ModelConfig
    from moelora_dist.models.model import MoELoRAModel
    from moelora_dist.models.weights import RandomWeights
    from moelora_dist.parallel.groups import ParallelGroups

    cfg = ModelConfig.from_dict(SHAPES)
    dev = torch.device("cuda", 0)
    return MoELoRAModel.build(cfg, ParallelGroups.single(dev), RandomWeights(
        cfg, torch.bfloat16, dev, seed=0), dtype=torch.bfloat16, max_loras=3, max_rank=16,
        progress=False)


def _engine(model, eager=False, num_pages=512, **kw):
    from moelora_dist.engine.config import EngineConfig
    from moelora_dist.engine.engine import Engine

    engine = Engine(model, EngineConfig(**{**dict(max_loras=3, max_rank=16, num_pages=num_pages,
                                                  max_num_batched_tokens=512,
                                                  enforce_eager=eager), **kw}))
    for i, r in enumerate((8, 16, 16)):
        name = f"a{i}"
        if model.pool.slot_of(name) is not None:
            model.pool.release_batch()
            model.pool.unload(name)
        engine.add_adapter(name, _adapter(name, model.cfg, r, seed=10 + i))
    return engine


def _requests(B, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 60, (B,), generator=g).tolist()  # ragged prompts, many pages
    return ([torch.randint(0, 4096, (n,), generator=g).tolist() for n in lens],
            [names[b % len(names)] for b in range(B)])


def _run(engine, prompts, names, n=8, arrivals=None):
    from moelora_dist.engine.sampling import SamplingParams
    from tests.engine_cases import drive

    params = SamplingParams(max_tokens=n, temperature=0.0, logprobs=0, ignore_eos=True)
    done = drive(engine, prompts, names, params, arrivals)
    return [done[i][:2] for i in range(len(prompts))]


@pytest.mark.parametrize("B,names", [
    (8, [None]),                      # all base, a full bucket: token for token
    (16, ["a0", None, "a1", "a2"]),   # mixed, a full bucket: token for token
    (5, ["a0", None, "a1"]),          # padded 5 -> 8
    (37, ["a0", "a1", "a2", None]),   # padded 37 -> 64
], ids=["base_B8", "mixed_B16", "mixed_B5_padded", "mixed_B37_padded"])
def test_graph_decode_equals_eager(model, B, names):
    prompts, names_ = _requests(B, names)
    graph, eager = _engine(model), _engine(model, eager=True)
    got, want = _run(graph, prompts, names_), _run(eager, prompts, names_)
    assert graph.counters["graph_steps"] >= 7 and eager.counters["graph_steps"] == 0
    assert graph.worker.graphs.captured and graph.worker.graphs.capture
    for (g_ids, g_lp), (w_ids, w_lp) in zip(got, want):
        if B in (8, 16):
            assert g_ids == w_ids
        k = next((i for i, (a, b) in enumerate(zip(g_ids, w_ids)) if a != b), len(g_ids))
        err = (torch.tensor(g_lp[:k]) - torch.tensor(w_lp[:k])).abs().max().item() if k else 0
        assert err <= LP_TOL, err


@pytest.mark.parametrize("B,names", [(16, ["a0", None, "a1", "a2"]), (37, ["a0", None])],
                         ids=["mixed_B16", "mixed_B37_padded"])
def test_async_steps_equal_steps_read_back_one_by_one(model, B, names):
    """CUDA graphs with the next step queued before the current one is read back (its token
    ids copied on the device from the sampled ones) against each step read back first: the
    same steps in the same order, so the same tokens and log-probabilities, bit for bit."""
    prompts, names_ = _requests(B, names, seed=11)
    fast, slow = _engine(model), _engine(model, async_steps=False)
    got, want = _run(fast, prompts, names_), _run(slow, prompts, names_)
    assert fast.counters["ahead_steps"] >= 6 and slow.counters["ahead_steps"] == 0
    assert got == want


def test_a_step_planned_ahead_never_waits_for_the_device(model, monkeypatch):
    """With ``async_steps`` the next step is scheduled, planned and queued while the device
    runs the current one: nothing in that launch may synchronize with the device (a pageable
    copy, a read-back), or the host would wait for the step in flight. CUDA's sync-debug mode
    makes any such call raise."""
    import moelora_dist.engine.engine as engine_mod

    engine = _engine(model)
    prompts, names = _requests(16, ["a0", None, "a1"], seed=12)
    _run(engine, prompts, names)  # captures every graph the same requests replay
    real, ahead_calls = engine_mod.launch_step, []

    def strict(eng, scheduled, ahead=None):
        if ahead is None:
            return real(eng, scheduled)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(eng, scheduled, ahead)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            ahead_calls.append(len(scheduled.entries))

    monkeypatch.setattr(engine_mod, "launch_step", strict)
    _run(engine, prompts, names)
    assert len(ahead_calls) >= 6


def _assert_mostly_agree(got, want):
    """Graph and eager outputs agree token for token up to each request's first fork, with
    log-probabilities within LP_TOL there, on at least half the tokens (bf16 near-ties may
    fork a request)."""
    agree = 0
    for (g_ids, g_lp), (w_ids, w_lp) in zip(got, want):
        k = next((i for i, (a, b) in enumerate(zip(g_ids, w_ids)) if a != b), len(g_ids))
        agree += k
        if k:
            assert (torch.tensor(g_lp[:k]) - torch.tensor(w_lp[:k])).abs().max() <= LP_TOL
    assert agree >= 0.5 * sum(len(g) for g, _ in got)


def test_mixed_steps_replay_graphs_and_equal_eager(model):
    """Arrivals while others decode: steps of <= 256 tokens mixing a prefill chunk with
    decodes replay the mixed graphs."""
    prompts, names = _requests(6, ["a0", None, "a1"], seed=3)
    arrivals = [0, 0, 2, 4, 5, 7]
    graph, eager = _engine(model), _engine(model, eager=True)
    got = _run(graph, prompts, names, arrivals=arrivals)
    want = _run(eager, prompts, names, arrivals=arrivals)
    assert any(not key[3] for key in graph.worker.graphs.captured)  # a mixed graph ran
    _assert_mostly_agree(got, want)


def test_prompt_chunk_graphs_equal_eager(model):
    """Prompts of 200-500 tokens arriving one by one (max_num_seqs 4): their chunks, alone or
    beside decodes, replay graphs of 256 and 512 tokens whose 5 sequence rows
    (``EngineConfig.graph_seqs``) leave the padding tokens to padding sequences."""
    g = torch.Generator().manual_seed(5)
    lens = [200, 500, 300, 450]
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in lens]
    names, arrivals = ["a0", None, "a1", "a2"], [0, 3, 6, 9]
    graph = _engine(model, max_num_seqs=4)
    eager = _engine(model, eager=True, max_num_seqs=4)
    got = _run(graph, prompts, names, arrivals=arrivals)
    want = _run(eager, prompts, names, arrivals=arrivals)
    assert graph.worker.graphs.seqs_for(512) == 5
    assert any(key[0] == 512 for key in graph.worker.graphs.captured)
    assert graph.counters["graph_steps"] == graph.counters["steps"]
    _assert_mostly_agree(got, want)


def test_adapter_swap_and_eviction_under_graphs(model):
    """Replace a0 by other weights in its slot, then evict through LRU with a fourth adapter:
    the captured graphs replay (no new capture) and serve the new weights, equal to eager."""
    graph, eager = _engine(model), _engine(model, eager=True)
    prompts, names = _requests(8, ["a0", "a1", None, "a2"], seed=1)
    before = _run(graph, prompts, names)
    keys = list(graph.worker.graphs.captured)
    graph.remove_adapter("a0")
    new = _adapter("a0", model.cfg, 8, seed=77)
    graph.add_adapter("a0", new)
    after = _run(graph, prompts, names)
    assert graph.worker.graphs.captured == keys  # replayed, not captured again
    rows = [b for b in range(8) if names[b] == "a0"]
    assert any(after[b][0] != before[b][0] for b in rows)
    assert all(after[b] == before[b] for b in range(8) if names[b] != "a0")
    graph.add_adapter("a3", _adapter("a3", model.cfg, 16, seed=78))  # 4 adapters, 3 slots
    names2 = ["a3" if n == "a1" else n for n in names]
    got = _run(graph, prompts, names2)
    assert graph.worker.graphs.captured == keys
    eager.remove_adapter("a0")
    eager.add_adapter("a0", new)
    eager.add_adapter("a3", _adapter("a3", model.cfg, 16, seed=78))
    want = _run(eager, prompts, names2)
    for (g_ids, g_lp), (w_ids, w_lp) in zip(got, want):
        assert g_ids == w_ids
        assert (torch.tensor(g_lp) - torch.tensor(w_lp)).abs().max() <= LP_TOL


def test_graph_steps_keep_a_nan_slot_to_itself(model):
    """Poison every buffer of one slot in place between two identical runs: the other slots'
    and the base rows' tokens and log-probabilities do not move a bit."""
    engine = _engine(model)
    prompts, names = _requests(16, ["a0", None, "a1", "a2"], seed=5)
    good = _run(engine, prompts, names)
    bad_slot = model.pool.slot_of("a1")
    for t in model.pool._all_tensors().values():
        if t.is_floating_point():
            t[bad_slot].view(-1)[0::2] = float("nan")
            t[bad_slot].view(-1)[1::2] = float("inf")
    bad = _run(engine, prompts, names)
    for b, n in enumerate(names):
        if n == "a1":
            assert not torch.isfinite(torch.tensor(bad[b][1])).all()
        else:
            assert bad[b] == good[b], b
    model.pool.release_batch()
    model.pool.unload("a1")


def test_page_pool_is_sized_from_free_memory(model):
    from moelora_dist.engine.config import EngineConfig
    from moelora_dist.engine.memory import GRAPH_RESERVE_BYTES, plan_pages

    free, total = torch.cuda.mem_get_info()
    pages = plan_pages(model, EngineConfig(gpu_memory_utilization=0.5), 4096)
    used = total - free
    expect = (0.5 * total - used - GRAPH_RESERVE_BYTES) / model.page_bytes(16)
    assert 0.8 * expect <= pages <= 1.05 * expect, (pages, expect)


@pytest.mark.parametrize("flags", [("FUSE_EXPAND",), ("FUSE_TOPK_SUM",),
                                   ("FUSE_EXPAND", "FUSE_TOPK_SUM")],
                         ids=["fuse_expand", "fuse_topk", "both"])
def test_fused_paths_graph_decode_equals_eager_and_matches_unfused(model, flags, monkeypatch):
    """The S10 fusions (off by default; ``lora_linear.FUSE_EXPAND``, ``model.FUSE_TOPK_SUM``):
    with them on, graph decode equals eager token for token (mixed adapters, a full bucket),
    and both stay within the logprob tolerance of the unfused engine; the top-k sum alone is
    the same bits, so its tokens equal the unfused ones."""
    from moelora_dist.models import lora_linear
    from moelora_dist.models import model as model_mod

    prompts, names_ = _requests(16, ["a0", None, "a1", "a2"], seed=3)
    plain = _run(_engine(model), prompts, names_)
    owner = {"FUSE_EXPAND": lora_linear, "FUSE_TOPK_SUM": model_mod}
    for f in flags:
        monkeypatch.setattr(owner[f], f, True)
    graph, eager = _engine(model), _engine(model, eager=True)
    got, want = _run(graph, prompts, names_), _run(eager, prompts, names_)
    assert graph.counters["graph_steps"] >= 7
    for (g_ids, g_lp), (w_ids, _), (p_ids, p_lp) in zip(got, want, plain):
        assert g_ids == w_ids
        if flags == ("FUSE_TOPK_SUM",):
            assert g_ids == p_ids
        k = next((i for i, (a, b) in enumerate(zip(g_ids, p_ids)) if a != b), len(g_ids))
        err = (torch.tensor(g_lp[:k]) - torch.tensor(p_lp[:k])).abs().max().item() if k else 0
        assert err <= LP_TOL, err
