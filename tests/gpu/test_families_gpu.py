"""The family variants on a CUDA GPU: the biased, clamped (gpt-oss) expert kernels in bf16
at moderate sizes, the routers captured in a CUDA graph, and whole DeepSeek-V3 / GLM-4.5 /
gpt-oss models (random weights, every LoRA target) against their CPU reference and decoded
from CUDA graphs.

Run with the device tool: ``PYTHONPATH=$PWD python3 -m pytest tests/gpu -m gpu -q``.
Tolerances: bf16 kernels as tests/gpu/test_kernels_gpu.py (2e-2 of the output magnitude: h
and per-pair outputs stored in bf16, the LoRA expand in tf32). Whole models in fp32 (Triton
products are TF32-class on GPUs) against the CPU references: 2e-2 of max |logit|, as
tests/multi_gpu/test_families_runner.py on GPUs; greedy tokens of the engine's CUDA-graph
steps against its eager steps (fp32: the padded bucket changes no token here).
"""

import pytest
import torch

from tests.conftest import effective_slots

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RTOL = 2e-2


def _close(got, want):
    scale = max(1.0, float(want.float().abs().max()))
    err = float((got.float() - want.float()).abs().max())
    assert err <= RTOL * scale, f"max abs error {err} at scale {scale}"


@pytest.mark.parametrize("T", [5, 64, 700], ids=["T5", "T64", "T700"])
@pytest.mark.parametrize("case", ["mixed", "many_slots", "all_invalid"])
def test_biased_clamped_experts_bf16(case, T):
    from moelora_dist.kernels.constants import Activation
    from moelora_dist.kernels.moe_lora.naive import experts_reference
    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
    from moelora_dist.testing.kernel_cases import make_case

    c = make_case(case, T=T, H=1024, E=16, I=512, K=4, R=32, dtype=torch.bfloat16,
                  device="cuda", seed=1)
    g = torch.Generator(device="cuda").manual_seed(2)
    b_gu = (torch.randn(16, 1024, generator=g, device="cuda") * 0.3).to(torch.bfloat16)
    b_d = (torch.randn(16, 1024, generator=g, device="cuda") * 0.3).to(torch.bfloat16)
    act = Activation("swiglu_oai", 1.702, 1.0)  # limit 1: the clamp engages at these sizes
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], act, c["slot_enabled_S"],
                         b_gate_up_EX=b_gu, b_down_EH=b_d)
    want = experts_reference(*args, effective_slots(c), c["lora"], act, b_gu, b_d)
    assert not torch.isnan(got).any()
    _close(got, want)
    if case != "all_invalid":  # biases and clamp move the output far beyond the bound
        plain = experts_reference(*args, effective_slots(c), c["lora"])
        assert (plain.float() - want.float()).abs().max() > 0.2


def test_routers_are_graph_safe_and_match_the_cpu():
    from moelora_dist.moe.router import route_sigmoid_grouped, route_topk_softmax

    T, E, K = 256, 256, 8
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.1
    static_in = logits.cuda()
    static_bias = bias.cuda()

    def both():
        return (route_sigmoid_grouped(static_in, static_bias, K, 8, 4, True, 2.5),
                route_topk_softmax(static_in, 4))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        both()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # no host sync inside, or the capture fails
        out = both()
    fresh = torch.randn(T, E, generator=g)
    static_in.copy_(fresh)
    graph.replay()
    want = (route_sigmoid_grouped(fresh, bias, K, 8, 4, True, 2.5), route_topk_softmax(fresh, 4))
    for (w, ids), (w_ref, ids_ref) in zip(out, want):
        order, ref_order = ids.long().sort(-1), ids_ref.long().sort(-1)
        assert torch.equal(order.values.cpu(), ref_order.values)
        torch.testing.assert_close(w.gather(1, order.indices).cpu(),
                                   w_ref.gather(1, ref_order.indices), rtol=1e-5, atol=1e-6)


def _engine(model, eager=False):
    from moelora_dist.engine.config import EngineConfig
    from moelora_dist.engine.engine import Engine
    from tests.family_configs import family_adapter

    engine = Engine(model, EngineConfig(max_loras=2, max_rank=8, page_size=16, num_pages=64,
                                        enforce_eager=eager))
    for name, rank, seed in (("a", 5, 1), ("b", 8, 2)):
        if model.pool.slot_of(name) is not None:  # a previous engine's adapter on this model
            model.pool.release_batch()
            model.pool.unload(name)
        engine.add_adapter(name, family_adapter(model.cfg, name, rank, seed))
    return engine


@pytest.fixture(scope="module", params=["deepseek_v3", "glm4_moe", "gpt_oss"])
def family(request):
    from moelora_dist.config.model import ModelConfig
    from moelora_dist.models.model import MoELoRAModel
    from moelora_dist.models.random_weights import RandomWeights
    from moelora_dist.parallel.groups import ParallelGroups
    from tests.family_configs import RAW

    cfg = ModelConfig.from_dict(RAW[request.param])
    models = [MoELoRAModel.build(cfg, ParallelGroups.single(dev),
                                 RandomWeights(cfg, torch.float32, "cpu", seed=0, std=0.2),
                                 dtype=torch.float32, max_loras=2, max_rank=8, progress=False)
              for dev in (torch.device("cuda", 0), torch.device("cpu"))]
    return request.param, models


PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [9, 10], list(range(11, 30))]
NAMES = ["a", None, "b"]


def test_family_on_gpu_matches_cpu_reference(family):
    name, (gpu, cpu) = family
    assert gpu.backend == "triton"
    for g_l, c_l in zip(_engine(gpu).prompt_logits(PROMPTS, NAMES),
                        _engine(cpu).prompt_logits(PROMPTS, NAMES)):
        _close(g_l, c_l)


def test_family_greedy_tokens_graphs_vs_eager(family):
    """Greedy decode replayed from CUDA graphs (sinks, windows, MLA's padded values, router
    LoRA and all) gives the eager decode's tokens."""
    from moelora_dist.engine.sampling import SamplingParams

    name, (gpu, _) = family
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    graph_engine = _engine(gpu)
    graph = graph_engine.generate(PROMPTS, params, NAMES)
    assert graph_engine.counters["graph_steps"] >= 4 and graph_engine.worker.graphs.captured
    eager_engine = _engine(gpu, eager=True)
    eager = eager_engine.generate(PROMPTS, params, NAMES)
    assert eager_engine.counters["graph_steps"] == 0
    assert [g.output_ids for g in graph] == [e.output_ids for e in eager]
