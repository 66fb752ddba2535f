"""DeepSeek-V3, GLM-4.5 and gpt-oss models on every layout of this world equal the same model
on one process (logits of a batch mixing two adapters and base requests; greedy tokens on
CPU). Layouts with ``tp < world`` have data-parallel replicas that split the requests.

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
from moelora_dist.models.model import MoELoRAModel
from moelora_dist.models.random_weights import RandomWeights
from moelora_dist.models.requests import Request
from moelora_dist.models.runner import ModelRunner
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
REQUESTS = [Request([3, 4, 5, 6, 7, 8, 9], "a"), Request([9, 10], None),
            Request([11, 12, 13, 14, 15, 16, 17, 18], "b"), Request([20, 21, 22], "a")]


def _runner(cfg: ModelConfig, groups: ParallelGroups, dispatcher: str) -> ModelRunner:
    source = RandomWeights(cfg, torch.float32, groups.device, seed=0, std=0.2)
    model = MoELoRAModel.build(cfg, groups, source, dtype=torch.float32, max_loras=2,
                               max_rank=8, dispatcher=dispatcher, progress=False)
    runner = ModelRunner(model)
    runner.add_adapter("a", family_adapter(cfg, "a", 5, 1))
    runner.add_adapter("b", family_adapter(cfg, "b", 8, 2))
    return runner


@pytest.fixture(scope="module")
def references():
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if CUDA else \
        torch.device("cpu")
    gens = [Request(r.input_ids, r.adapter, max_new_tokens=4, ignore_eos=True) for r in REQUESTS]
    out = {}
    for name, cfg in CFGS.items():
        runner = _runner(cfg, ParallelGroups.single(dev), "auto")
        out[name] = (runner.prompt_logits(REQUESTS), runner.generate(gens))
    return out, gens


@pytest.mark.parametrize("dispatcher", ["all_reduce", "all_to_all", "all_to_all_fixed"])
@pytest.mark.parametrize("family,layout", CASES,
                         ids=[f"{n}-tp{x.tp}-ep{x.ep}" for n, x in CASES])
def test_family_matches_one_process(family, layout, dispatcher, references):
    refs, gens = references
    ref_logits, ref_gens = refs[family]
    runner = _runner(CFGS[family], init_parallel(layout.tp, layout.ep), dispatcher)
    got = runner.prompt_logits(REQUESTS)
    out = runner.generate(gens)  # every collective runs before any assert
    dp_rank = runner.model.groups.rank_layout.dp_rank
    mine = [i for i in range(len(REQUESTS)) if i % layout.dp == dp_rank]
    have = range(len(REQUESTS)) if runner.model.groups.rank == 0 else mine
    for i in have:
        g, r = got[i], ref_logits[i]
        if CUDA:
            assert (g - r).abs().max() <= 2e-2 * r.abs().max()
        else:
            torch.testing.assert_close(g, r, atol=1e-4, rtol=0)
            assert out[i].output_ids == ref_gens[i].output_ids
