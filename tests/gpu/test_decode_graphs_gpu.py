"""Decode steps replayed from CUDA graphs against eager decode, bf16 on one GPU.

Run with the device tool: ``PYTHONPATH=$PWD python3 -m pytest tests/gpu -m gpu -q``.
Model: random bf16 weights, 2 layers, H 512, 8 q / 2 kv heads of 64, 32 experts top-4,
I 256 (Triton MoE kernels, mem-efficient attention), 3 adapters of rank 8 and 16.

Tolerance: the graph runs the padded batch (T = bucket, not B) and attends over the whole
cache capacity with a mask, so GEMM tilings and attention key blocks may differ from eager;
both round activations to bf16 (8 mantissa bits, 0.4 % relative) at every layer, so after two
layers the logits may differ by a few bf16 ulps of their magnitude. ``max|diff| <= 2e-2 *
max|logit|`` (the kernel tests' bound); an adapter moves the logits by far more (checked).
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BF16_RTOL = 2e-2
SHAPES = dict(model_type="qwen3_moe", vocab_size=4096, hidden_size=512, num_attention_heads=8,
              num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
              moe_intermediate_size=256, intermediate_size=1024, norm_topk_prob=True,
              rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
              max_position_embeddings=4096, num_hidden_layers=2)


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
    m = MoELoRAModel.build(cfg, ParallelGroups.single(dev), RandomWeights(cfg, torch.bfloat16,
                           dev, seed=0), dtype=torch.bfloat16, max_loras=3, max_rank=16,
                           progress=False)
    for i, r in enumerate((8, 16, 16)):
        m.pool.load(_adapter(f"a{i}", cfg, r, seed=10 + i))
    return m


def _prefill(model, cache, prompts):
    from moelora_dist.lora.batch_info import build_batch_info
    from moelora_dist.models.batch import ForwardBatch

    lens = [len(p) for p in prompts]
    batch = ForwardBatch.build(lens, [0] * len(lens), model.device,
                               cache_rows=list(range(len(lens))))
    ids = torch.tensor([t for p in prompts for t in p], device=model.device)
    info = build_batch_info(batch.seg_indptr_B1, torch.full((len(lens),), -1,
                              device=model.device), model.pool.slot_rank_S)
    model.forward(ids, batch, cache, info)


def _eager(model, cache, ids, pos, slots):
    from moelora_dist.lora.batch_info import build_batch_info
    from moelora_dist.models.batch import ForwardBatch

    batch = ForwardBatch.build([1] * len(ids), pos, model.device, cache_rows=list(range(len(ids))))
    info = build_batch_info(batch.seg_indptr_B1, torch.tensor(slots, device=model.device),
                              model.pool.slot_rank_S)
    return model.logits(model.forward(torch.tensor(ids, device=model.device), batch, cache, info))


def _close(got, want):
    err = (got.float() - want.float()).abs().max().item()
    assert err <= BF16_RTOL * want.abs().max().item(), f"max abs error {err}"


def _setup(model, B, names, seed=0):
    from moelora_dist.models.graphs import DecodeGraphs

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 40, (B,), generator=g).tolist()  # different lengths per request
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in lens]
    slots = [model.pool.slot_of(names[b % len(names)]) if names[b % len(names)] else -1
             for b in range(B)]
    graphs = DecodeGraphs(model)
    assert graphs.capture
    cache = graphs.cache_for(B, 64)
    _prefill(model, cache, prompts)
    return graphs, cache, [p[-1] for p in prompts], [n - 1 for n in lens], slots


@pytest.mark.parametrize("B,names", [
    (5, [None]),                # all base, padded 5 -> 8
    (5, ["a0", None, "a1"]),    # mixed, padded
    (64, ["a0", "a1", "a2", None]),  # a full bucket, every slot and base
], ids=["base_B5", "mixed_B5", "mixed_B64"])
def test_graph_replay_matches_eager(model, B, names):
    graphs, cache, ids, pos, slots = _setup(model, B, names)
    for step in range(3):
        got, _ = graphs.step(ids, pos, slots)
        got = got.clone()
        want = _eager(model, cache, ids, pos, slots)
        _close(got, want)
        ids, pos = want.argmax(-1).tolist(), [p + 1 for p in pos]
    lora = any(s >= 0 for s in slots)
    assert graphs.captured == [(8 if B == 5 else 64, lora)]
    if lora:  # the adapters matter at this tolerance
        base = _eager(model, cache, ids, pos, [-1] * B)
        rows = [b for b in range(B) if slots[b] >= 0]
        assert (base[rows] - _eager(model, cache, ids, pos, slots)[rows]).abs().max() > \
            10 * BF16_RTOL * base.abs().max()


def test_graph_serves_swapped_adapter_without_recapture(model):
    from moelora_dist.models.graphs import DecodeGraphs  # noqa: F401

    graphs, cache, ids, pos, slots = _setup(model, 6, ["a0", "a1", None], seed=1)
    before, _ = graphs.step(ids, pos, slots)
    before = before.clone()
    entry = graphs._graphs[(8, True)]
    slot = model.pool.slot_of("a0")
    model.pool.unload("a0")  # replace a0 in its slot by other weights, same name
    model.pool.load(_adapter("a0", model.cfg, 8, seed=77))
    try:
        assert model.pool.slot_of("a0") == slot
        after, _ = graphs.step(ids, pos, slots)
        assert graphs._graphs[(8, True)] is entry  # replayed, not captured again
        _close(after, _eager(model, cache, ids, pos, slots))
        rows = [b for b in range(6) if slots[b] == slot]
        assert (after[rows] - before[rows]).abs().max() > 10 * BF16_RTOL * before.abs().max()
        # Evict by loading a fourth adapter into the full pool (LRU): slots change meaning.
        model.pool.load(_adapter("a3", model.cfg, 16, seed=78))
        slots2 = [model.pool.slot_of("a3") if s >= 0 else -1 for s in slots]
        got, _ = graphs.step(ids, pos, slots2)
        _close(got, _eager(model, cache, ids, pos, slots2))
    finally:
        for name in [n for n in ("a0", "a1", "a2", "a3") if model.pool.slot_of(n) is not None]:
            model.pool.unload(name)
        for i, r in enumerate((8, 16, 16)):
            model.pool.load(_adapter(f"a{i}", model.cfg, r, seed=10 + i))


def test_generate_greedy_tokens_equal_eager(model):
    from moelora_dist.models.requests import Request
    from moelora_dist.models.runner import ModelRunner

    runner = ModelRunner(model)
    for i, r in enumerate((8, 16, 16)):
        runner.add_adapter(f"a{i}", _adapter(f"a{i}", model.cfg, r, seed=10 + i))
    g = torch.Generator().manual_seed(3)
    reqs = [Request(torch.randint(0, 4096, (n,), generator=g).tolist(),
                    [None, "a0", "a1", "a2"][i % 4], max_new_tokens=6, ignore_eos=True)
            for i, n in enumerate((5, 17, 9, 30, 2, 11, 8, 21))]  # B = 8: a bucket
    eager = runner.generate(reqs, cuda_graphs=False)
    graph = runner.generate(reqs)
    assert runner.decode_graphs is not None and runner.decode_graphs.captured
    assert [x.output_ids for x in graph] == [x.output_ids for x in eager]


def test_new_cache_drops_graphs_and_captures_again(model):
    """A cache of another shape invalidates every graph (they hold the old cache's addresses);
    the next step captures into a fresh memory pool and still equals eager."""
    graphs, cache, ids, pos, slots = _setup(model, 2, ["a1", None], seed=2)
    graphs.step(ids, pos, slots)
    assert graphs.captured == [(2, True)]
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (7, 12, 3, 9, 20)]
    cache2 = graphs.cache_for(5, 100)  # more rows and a longer capacity: a new cache
    assert cache2 is not cache and graphs.captured == []
    _prefill(model, cache2, prompts)
    ids, pos, slots = [p[-1] for p in prompts], [len(p) - 1 for p in prompts], [-1, 0, -1, 1, 2]
    for _ in range(2):
        got, _ = graphs.step(ids, pos, slots)
        got = got.clone()
        want = _eager(model, cache2, ids, pos, slots)
        _close(got, want)
        ids, pos = want.argmax(-1).tolist(), [p + 1 for p in pos]
    assert graphs.captured == [(8, True)]


def test_dense_lora_bf16_matches_token_loop():
    """The dense-LoRA Triton kernels on CUDA in bf16 against the fp64 token loop on the same
    bf16 factors, with q/k/v-like groups of three modules. Bounds: into an fp32 output only
    TF32 rounds in the expand (the fp32 shrink to 10 mantissa bits, ~5e-4 relative), so 2e-3
    of the largest delta; into a bf16 output one more rounding (2^-8), so 1e-2."""
    from moelora_dist.kernels.dense_lora import ops
    from moelora_dist.testing.references import dense_lora_token_loop

    g = torch.Generator(device="cuda").manual_seed(5)
    S, R, I, T = 8, 16, 2048, 64
    outs = (512, 128, 128)
    a = [(torch.randn(S, R, I, generator=g, device="cuda") * 0.05).bfloat16() for _ in outs]
    b = [(torch.randn(S, o, R, generator=g, device="cuda") * 0.05).bfloat16() for o in outs]
    rank = torch.tensor([16, 8, 16, 0, 16, 4, 16, 16], dtype=torch.int32, device="cuda")
    slot_T = torch.tensor([(t % (S + 1)) - 1 for t in range(T)], dtype=torch.int32,
                          device="cuda")
    x = torch.randn(T, I, generator=g, device="cuda").bfloat16()
    eff = torch.where((slot_T >= 0) & (rank[slot_T.clamp(min=0).long()] > 0), slot_T, -1)
    for dtype, bound in ((torch.float32, 2e-3), (torch.bfloat16, 1e-2)):
        ys = [torch.zeros(T, o, dtype=dtype, device="cuda") for o in outs]
        ops.add_dense_lora(ys, x, a, b, slot_T, rank)
        for y, aj, bj in zip(ys, a, b):
            masked_a = aj.clone()
            for s_, r in enumerate(rank.tolist()):
                masked_a[s_, r:] = 0
            want = dense_lora_token_loop(x, masked_a, bj, eff)
            err = (y.float() - want).abs().max().item()
            assert err <= bound * want.abs().max().item(), (dtype, err)
            assert (y[eff < 0] == 0).all()
