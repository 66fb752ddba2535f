"""The engine on every layout of this world equals the one-process engine (logits of a batch
mixing two adapters and base requests; greedy tokens on CPU; a stream of arrivals through a
page pool small enough to preempt). Layouts with ``tp < world`` have data-parallel replicas
that split the requests; global rank 0 must hold them all, each replica's leader its share,
and the other ranks (which only follow the leader's plans) none. Adapter ``b`` is added after
the engine is built, in memory: only the leader's call takes effect and its tensors reach the
other ranks inside the step plan.

    .venv/bin/torchrun --nproc-per-node 4 -m pytest tests/multi_gpu/test_e2e_engine.py -q
    python -m launch --nproc-per-node 2 --device cuda -m pytest tests/multi_gpu -q

Needs neither transformers nor peft: every rank writes the same seeded Qwen3-MoE-format
checkpoint (hybrid: layer 1 is a dense MLP; 2 kv heads so tp=4 replicates them) into its own
temporary directory, and registers the same seeded random adapters (attention, dense MLP and
every expert). Tolerance: fp32 on CPU (gloo) differs by summation order only, atol 1e-4 on O(1)
logits; on GPUs the experts run through Triton (TF32-class products): 2e-2 of max |logit|.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA
from moelora_dist.config.model import ModelConfig
from moelora_dist.engine.engine import Engine
from moelora_dist.engine.sampling import SamplingParams
from moelora_dist.parallel.groups import ParallelGroups, init_parallel
from moelora_dist.parallel.layout import valid_layouts
from tests.engine_cases import drive

WORLD = int(os.environ.get("WORLD_SIZE", "0"))
CUDA = os.environ.get("MOELORA_DIST_BACKEND") == "nccl" or (
    os.environ.get("MOELORA_DIST_BACKEND") is None and torch.cuda.is_available())
RAW = dict(model_type="qwen3_moe", vocab_size=96, hidden_size=32, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
           num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=40,
           norm_topk_prob=True, mlp_only_layers=[1], rms_norm_eps=1e-6,
           rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
           max_position_embeddings=128, eos_token_id=None)
CFG = ModelConfig.from_dict(RAW)
LAYOUTS = [lay for lay in (valid_layouts(WORLD, CFG.num_experts, CFG.moe_intermediate)
                           if WORLD else [])
           if CFG.num_heads % lay.tp == 0 and (lay.tp % CFG.num_kv_heads == 0
                                                or CFG.num_kv_heads % lay.tp == 0)]
PROMPTS = [[3, 4, 5, 6, 7], [9, 10], [11, 12, 13, 14, 15, 16, 17], [20, 21, 22]]
NAMES = ["a", None, "b", "a"]
GEN = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
# a stream of arrivals through 7 pages of 4 tokens: preemption and recompute on every layout
ARRIVALS = dict(prompts=PROMPTS + [[30, 31, 32, 33, 34, 35, 36, 37, 38], [40]],
                names=NAMES + ["b", None], arrivals=[0, 0, 1, 2, 2, 5],
                params=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))


def _write_checkpoint(d: str) -> None:
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    H, D, E, I, F = 32, 8, CFG.num_experts, CFG.moe_intermediate, CFG.dense_intermediate
    t = {"model.embed_tokens.weight": rn(96, H), "lm_head.weight": rn(96, H),
         "model.norm.weight": 1 + rn(H)}
    for layer in range(CFG.num_layers):
        p = f"model.layers.{layer}"
        t.update({f"{p}.input_layernorm.weight": 1 + rn(H),
                  f"{p}.post_attention_layernorm.weight": 1 + rn(H),
                  f"{p}.self_attn.q_proj.weight": rn(4 * D, H),
                  f"{p}.self_attn.k_proj.weight": rn(2 * D, H),
                  f"{p}.self_attn.v_proj.weight": rn(2 * D, H),
                  f"{p}.self_attn.o_proj.weight": rn(H, 4 * D),
                  f"{p}.self_attn.q_norm.weight": 1 + rn(D),
                  f"{p}.self_attn.k_norm.weight": 1 + rn(D)})
        if CFG.is_moe_layer(layer):
            t[f"{p}.mlp.gate.weight"] = rn(E, H)
            for e in range(E):
                t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = rn(I, H)
                t[f"{p}.mlp.experts.{e}.up_proj.weight"] = rn(I, H)
                t[f"{p}.mlp.experts.{e}.down_proj.weight"] = rn(H, I)
        else:
            t.update({f"{p}.mlp.gate_proj.weight": rn(F, H), f"{p}.mlp.up_proj.weight": rn(F, H),
                      f"{p}.mlp.down_proj.weight": rn(H, F)})
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(RAW, f)


def _adapter(name: str, rank: int, seed: int) -> CanonicalAdapter:
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    f = lambda o, i, e=1: LoRAFactors(rn(e, rank, i), rn(e, o, rank), 0.5)  # noqa: E731
    H, D, E, I, F = 32, 8, CFG.num_experts, CFG.moe_intermediate, CFG.dense_intermediate
    dense, moe = {}, {}
    for layer in range(CFG.num_layers):
        p = f"layers.{layer}"
        dense.update({f"{p}.self_attn.q_proj": f(4 * D, H), f"{p}.self_attn.k_proj": f(2 * D, H),
                      f"{p}.self_attn.v_proj": f(2 * D, H), f"{p}.self_attn.o_proj": f(H, 4 * D)})
        if CFG.is_moe_layer(layer):
            moe[layer] = MoELayerLoRA(E, f(I, H, E), f(I, H, E), f(H, I, E))
        else:
            dense.update({f"{p}.mlp.gate_proj": f(F, H), f"{p}.mlp.up_proj": f(F, H),
                          f"{p}.mlp.down_proj": f(H, F)})
    return CanonicalAdapter(name, moe=moe, dense=dense)


def _engine(model_dir: str, groups: ParallelGroups, dispatcher: str, **kw) -> Engine:
    engine = Engine.from_pretrained(model_dir, {"a": _adapter("a", 4, 1)}, groups=groups,
                                    max_loras=2, max_rank=8, dispatcher=dispatcher,
                                    progress=False, page_size=4, **kw)
    engine.add_adapter("b", _adapter("b", 8, 2))  # the leader's call; followers get it planned
    return engine


def _arrivals(engine):
    """Every replica's leader serves the whole stream; the other ranks follow."""
    if not engine.is_leader:
        engine.follow()
        return None
    done = drive(engine, **ARRIVALS)
    engine.shutdown()
    return done, engine.scheduler.num_preemptions


@pytest.fixture(scope="module")
def reference():
    d = tempfile.mkdtemp(prefix="e2e_engine_")
    _write_checkpoint(d)
    # This rank's own GPU (init_parallel has not set the device yet when the fixture runs).
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if CUDA else \
        torch.device("cpu")
    engine = _engine(d, ParallelGroups.single(dev), "auto", num_pages=64)
    small = _engine(d, ParallelGroups.single(dev), "auto", num_pages=7,
                    max_num_batched_tokens=8)
    return (d, engine.prompt_logits(PROMPTS, NAMES), engine.generate(PROMPTS, GEN, NAMES),
            _arrivals(small))


def _close(g, r):
    if CUDA:
        assert (g - r).abs().max() <= 2e-2 * r.abs().max()
    else:
        torch.testing.assert_close(g, r, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{x.tp}-ep{x.ep}" for x in LAYOUTS])
@pytest.mark.parametrize("dispatcher", ["all_reduce", "all_to_all"])
def test_engine_matches_one_process(layout, dispatcher, reference):
    d, ref_logits, ref_gens, _ = reference
    engine = _engine(d, init_parallel(layout.tp, layout.ep), dispatcher, num_pages=64)
    got = engine.prompt_logits(PROMPTS, NAMES)
    out = engine.generate(PROMPTS, GEN, NAMES)  # every collective runs before any assert
    g = engine.groups
    mine = [i for i in range(len(PROMPTS)) if i % layout.dp == g.rank_layout.dp_rank]
    have = range(len(PROMPTS)) if g.rank == 0 else (mine if engine.is_leader else [])
    assert all(got[i] is not None and out[i] is not None for i in have)
    assert all(got[i] is None and out[i] is None for i in range(len(PROMPTS)) if i not in have)
    for i in have:
        _close(got[i], ref_logits[i])
        assert len(out[i].output_ids) == 4
        if not CUDA:
            assert out[i].output_ids == ref_gens[i].output_ids


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{x.tp}-ep{x.ep}" for x in LAYOUTS])
def test_arrivals_with_preemption_match_one_process(layout, reference):
    d, _, _, (ref_done, ref_preempted) = reference
    engine = _engine(d, init_parallel(layout.tp, layout.ep), "auto", num_pages=7,
                     max_num_batched_tokens=8)
    got = _arrivals(engine)  # every collective runs before any assert
    assert ref_preempted > 0
    if engine.is_leader:
        done, preempted = got
        assert preempted == ref_preempted and sorted(done) == sorted(ref_done)
        for i, (ids, _, reason) in done.items():
            assert len(ids) == 6 and reason == "length"
            if not CUDA:
                assert ids == ref_done[i][0], i
    else:
        assert got is None
