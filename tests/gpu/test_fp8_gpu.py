"""FP8 kernels and an FP8 model on a CUDA GPU (bf16 activations, the hardware e4m3 cast).

Run with the device tool: ``PYTHONPATH=$PWD python3 -m pytest tests/gpu/test_fp8_gpu.py -q``.

Tolerance: the kernels and the reference (``experts_reference`` with FP8 weights: dequantized
weights, simulated activation quantization) compute the same quantized products; they differ
by bf16 storage of ``h`` and the outputs and by rare e4m3 rounding flips of an activation,
so the absolute bound is 2e-2 of the output's largest magnitude (as the bf16 kernel tests).
"""

import pytest
import torch

from tests.conftest import effective_slots

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RTOL = 2e-2
# (H, E_local, K, I, R): the benchmark shapes (Qwen3-30B-A3B at EP 4, Mixtral-8x7B, DeepSeek-V3
# routed at EP 8 with 32 local experts), ranks R, R/2, 0 and R mixed in the kernel cases.
SHAPES = {"qwen3": (2048, 32, 8, 768, 64), "mixtral": (4096, 8, 2, 14336, 16),
          "deepseek": (7168, 32, 8, 2048, 16)}


def _close(got, want):
    assert not torch.isnan(got).any()
    scale = want.float().abs().max().item() + 1e-6
    torch.testing.assert_close(got.float(), want.float(), atol=RTOL * scale, rtol=RTOL)


@pytest.mark.parametrize("T", [5, 64, 700], ids=["T5", "T64", "T700"])
@pytest.mark.parametrize("case", ["mixed", "one_expert", "no_lora_tokens", "all_invalid",
                                  "many_slots"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_moe_lora_fp8_matches_reference(shape, case, T):
    from moelora_dist.kernels.block_fp8.naive import quantize_weight
    from moelora_dist.kernels.moe_lora.naive import experts_reference
    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
    from moelora_dist.testing.kernel_cases import make_case

    H, E, K, I, R = SHAPES[shape]
    c = make_case(case, T=T, H=H, E=E, I=I, K=K, R=R, dtype=torch.bfloat16, device="cuda",
                  seed=2)
    w_gu, w_d = quantize_weight(c["w_gate_up_EXH"]), quantize_weight(c["w_down_EHI"])
    args = (c["x_TH"], w_gu, w_d, c["topk_weights_TK"], c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], slot_enabled_S=c["slot_enabled_S"])
    _close(got, experts_reference(*args, effective_slots(c), c["lora"]))


@pytest.mark.parametrize("T,N,K", [(1, 4096, 2048), (64, 576, 7168), (1000, 2048, 4096),
                                   (7, 1000, 200)], ids=str)
def test_block_fp8_linear_matches_reference(T, N, K):
    from moelora_dist.kernels.block_fp8 import naive, ops

    g = torch.Generator(device="cuda").manual_seed(0)
    w = naive.quantize_weight(torch.randn(N, K, generator=g, device="cuda") * K ** -0.5)
    x = torch.randn(T, K, generator=g, device="cuda").to(torch.bfloat16)
    b = torch.randn(N, generator=g, device="cuda").to(torch.bfloat16)
    _close(ops.block_fp8_linear(x, w, b), naive.block_fp8_linear(x, w, b))
    _close(ops.block_fp8_linear(x, w, b, split_k=1), naive.block_fp8_linear(x, w, b))


@pytest.mark.parametrize("T", [1, 64])
def test_block_fp8_linear_split_k_in_a_graph(T):
    """Qwen3's o_proj shape at decode sizes, where the launch splits K (8 and 5 partials on an
    H200): a CUDA-graph replay gives the eager bits, and both match the reference."""
    from moelora_dist.kernels.block_fp8 import naive, ops
    from moelora_dist.kernels.device import num_sms

    g = torch.Generator(device="cuda").manual_seed(1)
    w = naive.quantize_weight(torch.randn(2048, 4096, generator=g, device="cuda") * 4096 ** -0.5)
    x = torch.randn(T, 4096, generator=g, device="cuda").to(torch.bfloat16)
    split = ops.split_k_for(T, 2048, 4096, 16 if T <= 16 else 32, 64, num_sms(x.device))
    assert split > 1
    eager = ops.block_fp8_linear(x, w, split_k=split)
    _close(eager, naive.block_fp8_linear(x, w))
    ops.block_fp8_linear(x, w, split_k=split)  # warm
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.block_fp8_linear(x, w, split_k=split)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_fp8_model_greedy_tokens_vs_dequantized_twin(tmp_path):
    """The tiny FP8 model on the GPU (bf16, the engine's graph decode) against its dequantized bf16
    twin (``--dequantize-fp8``): the only difference is the activation quantization, so every
    FP8 greedy token must be a near-best token of the twin on the same prefix (within 3x the
    largest FP8-vs-twin logit difference measured on the prompts), and most are its best."""
    import dataclasses

    from moelora_dist.config.model import ModelConfig
    from moelora_dist.engine.engine import Engine
    from moelora_dist.engine.sampling import SamplingParams
    from moelora_dist.parallel.groups import ParallelGroups
    from tests.e2e_cases import GEN_REQUESTS
    from tests.fp8_factory import build_fp8_case

    case = build_fp8_case("qwen3_moe", tmp_path, references=False)
    groups = ParallelGroups.single(torch.device("cuda", torch.cuda.current_device()))
    cfg = ModelConfig.from_dir(str(case.model_dir))
    runners = {}
    for deq in (False, True):
        c = dataclasses.replace(cfg, fp8=dataclasses.replace(cfg.fp8, dequantize=deq))
        r = Engine.from_pretrained(str(case.model_dir), groups=groups, dtype=torch.bfloat16,
                                   max_loras=2, max_rank=8, progress=False, model_config=c,
                                   num_pages=256)
        for name, path in case.adapter_dirs.items():
            r.add_adapter(name, str(path))
        runners[deq] = r
    ids_, names = [r[0] for r in GEN_REQUESTS], [r[1] for r in GEN_REQUESTS]
    diff = max((a - b).abs().max().item() for a, b in zip(
        runners[False].prompt_logits(ids_, names), runners[True].prompt_logits(ids_, names)))
    assert 0 < diff < 2.0
    outs = runners[False].generate(ids_, [SamplingParams(max_tokens=n, temperature=0.0)
                                          for _, _, n in GEN_REQUESTS], names)
    best = total = 0
    for g, (ids, a, _) in zip(outs, GEN_REQUESTS):
        seq = list(ids)
        for tok in g.output_ids:
            twin = runners[True].prompt_logits([seq], a)[0][-1]
            assert twin.max() - twin[tok] <= 3 * diff, (seq, tok)
            best += int(twin.argmax()) == tok
            total += 1
            seq.append(tok)
    assert best >= 0.75 * total
