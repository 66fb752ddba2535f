"""FP8 checkpoints end to end on one process: a tiny model of each family, quantized in the
test to the exact Hugging Face fine-grained FP8 layout (tests/fp8_factory.py), served with two
PEFT adapters and base-only requests in one batch.

Two references, both transformers + PEFT on the same FP8 checkpoint (its own FP8 path, which
on a CPU dequantizes the weights with their scales), one request at a time:

- ``--dequantize-fp8``: our loader dequantizes the same way, activations stay unquantized; the
  math is transformers' exactly, so the fp32 tolerance of test_e2e_single.py holds (1e-4).
- the FP8 runtime (activations quantized per token and 128 columns in every base GEMM, LoRA on
  the unquantized ones): against the reference with the same activation quantization
  simulated; tolerance and its reason in tests/fp8_checks.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moelora_dist.config.model import ModelConfig
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight
from moelora_dist.engine.engine import Engine
from moelora_dist.engine.sampling import SamplingParams
from tests.e2e_cases import GEN_REQUESTS, REQUESTS, hf_logits
from tests.fp8_checks import assert_fp8_close, fp8_mismatch, greedy_matches_up_to_ties
from tests.fp8_factory import build_fp8_case

ATOL = 1e-4
VARIANTS = {  # name: (arch, build options)
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_hybrid": ("qwen3_moe", {"hybrid": True}),
    "mixtral": ("mixtral", {}),
    "olmoe": ("olmoe", {}),
    # fused 3-D expert tensors, FP8 lm_head, power-of-two (ue8m0) scales
    "mixtral_fused_lm_head": ("mixtral", {"fused": True, "lm_head": True}),
    "qwen3_ue8m0": ("qwen3_moe", {"scale_fmt": "ue8m0"}),
    # no dim a multiple of 128: partial last blocks everywhere (reference: the fp32 twin)
    "olmoe_partial": ("olmoe", {"partial": True}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, tmp_path_factory):
    arch, opts = VARIANTS[request.param]
    return build_fp8_case(arch, tmp_path_factory.mktemp(request.param), **opts)


def _runner(case, dequantize: bool = False) -> Engine:
    cfg = ModelConfig.from_dir(str(case.model_dir))
    assert cfg.fp8 is not None
    if dequantize:
        cfg = dataclasses.replace(cfg, fp8=dataclasses.replace(cfg.fp8, dequantize=True))
    runner = Engine.from_pretrained(str(case.model_dir), max_loras=2, max_rank=8,
                                    progress=False, model_config=cfg, num_pages=128)
    for name, path in case.adapter_dirs.items():
        runner.add_adapter(name, str(path))
    return runner


def _logits(runner):
    return runner.prompt_logits([ids for ids, _ in REQUESTS], [a for _, a in REQUESTS])


def test_fp8_weights_stay_fp8(case):
    model = _runner(case).model
    moe = next(layer["moe"] for layer in model.layers if "moe" in layer)
    assert isinstance(moe.base.w_gate_up, BlockFP8Weight)
    assert isinstance(moe.base.w_down, BlockFP8Weight)
    assert isinstance(model.layers[0]["attn"].w["q_proj"], BlockFP8Weight)
    assert moe.base.w_gate_up.weight.dtype == torch.float8_e4m3fn


def test_dequantized_fp8_matches_transformers_fp8_path(case):
    ours = _logits(_runner(case, dequantize=True))
    ref = [case.hf_plain[a](input_ids=torch.tensor([ids])).logits[0].float().detach()
           for ids, a in REQUESTS]
    base = [case.hf_plain[None](input_ids=torch.tensor([ids])).logits[0].float().detach()
            for ids, _ in REQUESTS]
    for i, ((ids, adapter), o, r, b) in enumerate(zip(REQUESTS, ours, ref, base)):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=0, msg=f"request {i} ({adapter})")
        if adapter is not None:  # the adapter must matter, or this proves nothing
            assert (r - b).abs().max() > 100 * ATOL


def test_fp8_logits_match_reference_with_quantized_activations(case):
    ours = _logits(_runner(case))
    assert_fp8_close(ours, hf_logits(case), case.arch)
    # The bound separates: the same weights without activation quantization fail it.
    plain = [case.hf_plain[a](input_ids=torch.tensor([ids])).logits[0].float().detach()
             for ids, a in REQUESTS]
    assert fp8_mismatch(plain, hf_logits(case)) is not None


def test_fp8_greedy_tokens_match_reference(case):
    outs = _runner(case).generate([ids for ids, _, _ in GEN_REQUESTS],
                                  [SamplingParams(max_tokens=n, temperature=0.0)
                                   for _, _, n in GEN_REQUESTS], [a for _, a, _ in GEN_REQUESTS])
    problem = greedy_matches_up_to_ties([g.output_ids for g in outs], case.hf, GEN_REQUESTS)
    assert problem is None, problem


def test_memory_report_matches_loaded_weights(case, capsys):
    """inspect-adapter --model-config sizes the base from the config alone; on one process it
    must equal what the runner actually holds (fp32 here), and the start-up line says FP8."""
    import json

    from moelora_dist.cli.main import main as cli_main
    from moelora_dist.config.weight_bytes import weight_bytes
    from moelora_dist.models.memory import describe_memory, weight_bytes as held

    model = _runner(case).model
    cfg = ModelConfig.from_dir(str(case.model_dir))
    want = weight_bytes(cfg, elem=4)
    if cfg.hidden_size % 128 == 0:
        assert held(model) == (want["fp8"], want["other"])
    else:  # gate/up cut at 200 rows: scale rows re-blocked to 8 rows each (more scales)
        assert held(model)[1] == want["other"] and held(model)[0] > want["fp8"]
    assert describe_memory(model).startswith("base FP8 (FP8 e4m3 weights, 128x128 block")
    capsys.readouterr()
    assert cli_main(["inspect-adapter", str(case.adapter_dirs["a1"]), "--model-config",
                     str(case.model_dir / "config.json")]) == 0
    out = capsys.readouterr().out
    assert f"base model: {case.arch}, FP8 (FP8 e4m3 weights" in out
    assert json.loads((case.model_dir / "config.json").read_text())["quantization_config"]
