"""DeepSeek-V3, GLM-4.5 and gpt-oss models served by the engine on every layout of this world
equal the one-process engine (logits of a batch mixing two adapters and base requests; greedy
tokens on CPU). Layouts with ``tp < world`` have data-parallel replicas that split the
requests: global rank 0 holds every result, each replica's leader its share, the other ranks
(which follow the leader's plans) none.

    .venv/bin/torchrun --nproc-per-node 4 -m pytest tests/multi_gpu/test_families_runner.py -q

Needs neither transformers nor peft nor a checkpoint: every rank draws the same seeded
weights (:class:`~moelora_dist.models.random_weights.RandomWeights`, full tensors then this
rank's slices) and registers the same seeded adapters on every module the pool serves (MLA
projections or q/k/v/o, shared experts, dense MLPs, the router, every expert). The models
turn on each family's variants: MLA with YaRN, grouped sigmoid routing with a correction
bias, gpt-oss's sinks, windows, biases and clamp. Tolerance: fp32 on CPU (gloo) differs by
summation order only, atol 1e-4 on O(1) logits; on GPUs (Triton, TF32-class products) 2e-2
of max |logit|.
"""

from __future__ import annotations

import os

import pytest
import torch

from moelora_dist.config.model import ModelConfig
from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.engine import Engine
from moelora_dist.engine.sampling import SamplingParams
from moelora_dist.models.model import MoELoRAModel
from moelora_dist.models.random_weights import RandomWeights
from moelora_dist.parallel.groups import ParallelGroups, init_parallel
from moelora_dist.parallel.layout import valid_layouts
from tests.family_configs import RAW, family_adapter

WORLD = int(os.environ.get("WORLD_SIZE", "0"))
CUDA = os.environ.get("MOELORA_DIST_BACKEND") == "nccl" or (
    os.environ.get("MOELORA_DIST_BACKEND") is None and torch.cuda.is_available())
CFGS = {name: ModelConfig.from_dict(raw) for name, raw in RAW.items()}


def _layouts(cfg):
    if not WORLD:
        return []
    return [lay for lay in valid_layouts(WORLD, cfg.num_experts, cfg.moe_intermediate)
            if cfg.num_heads % lay.tp == 0 and (lay.tp % cfg.num_kv_heads == 0
                                                 or cfg.num_kv_heads % lay.tp == 0)]


CASES = [(name, lay) for name, cfg in CFGS.items() for lay in _layouts(cfg)]
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18], [20, 21, 22]]
NAMES = ["a", None, "b", "a"]
GEN = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _engine(cfg: ModelConfig, groups: ParallelGroups, dispatcher: str) -> Engine:
    source = RandomWeights(cfg, torch.float32, groups.device, seed=0, std=0.2)
    model = MoELoRAModel.build(cfg, groups, source, dtype=torch.float32, max_loras=2,
                               max_rank=8, dispatcher=dispatcher, progress=False)
    engine = Engine(model, EngineConfig(max_loras=2, max_rank=8, page_size=4, num_pages=64,
                                        dispatcher=dispatcher))
    for name, rank, seed in (("a", 5, 1), ("b", 8, 2)):  # every rank: built collectively
        engine.adapters.add(name, family_adapter(cfg, name, rank, seed))
    engine.adapters.take_ops()
    return engine


@pytest.fixture(scope="module")
def references():
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if CUDA else \
        torch.device("cpu")
    out = {}
    for name, cfg in CFGS.items():
        engine = _engine(cfg, ParallelGroups.single(dev), "auto")
        out[name] = (engine.prompt_logits(PROMPTS, NAMES), engine.generate(PROMPTS, GEN, NAMES))
    return out


@pytest.mark.parametrize("dispatcher", ["all_reduce", "all_to_all", "all_to_all_fixed"])
@pytest.mark.parametrize("family,layout", CASES,
                         ids=[f"{n}-tp{x.tp}-ep{x.ep}" for n, x in CASES])
def test_family_matches_one_process(family, layout, dispatcher, references):
    ref_logits, ref_gens = references[family]
    engine = _engine(CFGS[family], init_parallel(layout.tp, layout.ep), dispatcher)
    got = engine.prompt_logits(PROMPTS, NAMES)
    out = engine.generate(PROMPTS, GEN, NAMES)  # every collective runs before any assert
    g = engine.groups
    mine = [i for i in range(len(PROMPTS)) if i % layout.dp == g.rank_layout.dp_rank]
    have = range(len(PROMPTS)) if g.rank == 0 else (mine if engine.is_leader else [])
    assert all(got[i] is not None and out[i] is not None for i in have)
    for i in have:
        r = ref_logits[i]
        if CUDA:
            assert (got[i] - r).abs().max() <= 2e-2 * r.abs().max()
        else:
            torch.testing.assert_close(got[i], r, atol=1e-4, rtol=0)
            assert out[i].output_ids == ref_gens[i].output_ids
