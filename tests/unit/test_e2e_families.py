"""End to end on one process for DeepSeek-V3, GLM-4.5 and gpt-oss: ``moelora-dist logits`` /
``generate`` on a batch mixing two real PEFT adapters (one on attention + shared experts +
dense MLP + router + experts, rank 5 with rsLoRA; one on the experts only) with base-only
requests, prompts longer than gpt-oss's window, equals transformers + PEFT run one request at
a time.

Tolerance (fp32 on CPU): both sides run the same products in fp32 in another order (SDPA vs
eager attention, sinks as an extra key, LoRA as a delta vs PEFT's parametrized weight,
routing weights scaled by 2.5 on DeepSeek-V3), so logits of size O(1-5) differ by ~1e-5 at
most; ``ATOL = 1e-4``. A dropped adapter, router LoRA, sink, window, bias or YaRN moves them by
O(0.1-1): each adapter is checked to change the logits by far more than the tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moelora_dist.cli.main import main as cli_main
from moelora_dist.engine.engine import Engine
from tests.e2e_cases import hf_generate, hf_logits, write_requests
from tests.e2e_families import FAMILY_GEN, FAMILY_REQUESTS, build_family_case
from tests.hf_families import FAMILIES

ATOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    return build_family_case(request.param, tmp_path_factory.mktemp(request.param))


def _cli_logits(case, tmp_path, *extra) -> list[torch.Tensor]:
    req = write_requests(tmp_path / "req.jsonl", FAMILY_REQUESTS)
    out = tmp_path / "logits.safetensors"
    rc = cli_main(["logits", "--model", str(case.model_dir), *case.adapter_args(),
                   "--requests", str(req), "--out", str(out), "--device", "cpu", *extra])
    assert rc == 0
    t = load_file(str(out))
    return [t[f"request_{i}"] for i in range(len(FAMILY_REQUESTS))]


def test_logits_command_matches_hf_peft(case, tmp_path):
    ours = _cli_logits(case, tmp_path)
    ref = hf_logits(case, FAMILY_REQUESTS)
    base = hf_logits(case, [(ids, None) for ids, _ in FAMILY_REQUESTS])
    for i, ((ids, adapter), o, r, b) in enumerate(zip(FAMILY_REQUESTS, ours, ref, base)):
        assert o.shape == (len(ids), 128)
        torch.testing.assert_close(o, r, atol=ATOL, rtol=0, msg=f"request {i} ({adapter})")
        if adapter is not None:  # the adapter must matter, or this test proves nothing
            assert (r - b).abs().max() > 100 * ATOL


@pytest.mark.parametrize("budget", ["8192", "7"], ids=["one_prefill", "chunked_prefill"])
def test_generate_command_matches_hf_generate(case, tmp_path, budget):
    req = write_requests(tmp_path / "gen.jsonl", FAMILY_GEN)
    out = tmp_path / "gen_out.jsonl"
    rc = cli_main(["generate", "--model", str(case.model_dir), *case.adapter_args(),
                   "--requests", str(req), "--out", str(out), "--device", "cpu",
                   "--max-batch-tokens", budget])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["output_ids"] for x in lines] == hf_generate(case, FAMILY_GEN)


def test_bfloat16_logits_match_transformers_bf16(case, tmp_path):
    """bf16 weights and activations (DeepSeek-V3 / GLM keep the router fp32, gpt-oss its
    norms, as transformers does). Rounding flips expert choices near ties in these tiny
    models, so transformers' own bf16 run differs from its fp32 run by up to ~1.2 on O(4)
    logits (DeepSeek-V3): base requests are compared with transformers in bf16 (measured:
    <= 0.09 apart), adapter requests with the fp32 reference at a sanity bound on the median
    position (a flip moves a few positions by O(1); a broken bf16 path moves all of them).
    PEFT's own bf16 run merges the delta into bf16 weights, which rounds differently and
    flips other choices, so it is no tighter reference."""
    from transformers import AutoModelForCausalLM

    ours = _cli_logits(case, tmp_path, "--dtype", "bfloat16")
    hf_bf16 = AutoModelForCausalLM.from_pretrained(str(case.model_dir), dtype=torch.bfloat16)
    hf_bf16.config._experts_implementation = "eager"
    ref = hf_logits(case, FAMILY_REQUESTS)
    for (ids, adapter), o, r in zip(FAMILY_REQUESTS, ours, ref):
        if adapter is None:
            with torch.no_grad():
                want = hf_bf16.eval()(input_ids=torch.tensor([ids])).logits[0].float()
            assert (o - want).abs().max() < 0.05 * want.abs().max()
        else:
            per_position = (o - r).abs().amax(dim=-1)
            assert per_position.median() < 0.1 * r.abs().max()


def test_router_lora_runs_only_while_an_adapter_has_one(case):
    """The router LoRA (adapter a1) reaches the logits; with only a2 (no router LoRA)
    resident the engine skips that path and still matches."""
    engine = Engine.from_pretrained(str(case.model_dir), max_loras=1, max_rank=8,
                                    progress=False, num_pages=256, page_size=4)
    engine.add_adapter("a2", str(case.adapter_dirs["a2"]))
    path = "layers.1.mlp." + ("router" if case.arch == "gpt_oss" else "gate")
    ids, name = FAMILY_REQUESTS[2]
    got = engine.prompt_logits([ids], name)[0]
    assert not engine.model.pool.targets(path)
    torch.testing.assert_close(got, hf_logits(case, [(ids, name)])[0], atol=ATOL, rtol=0)
    engine.add_adapter("a1", str(case.adapter_dirs["a1"]))
    ids, name = FAMILY_REQUESTS[0]
    got = engine.prompt_logits([ids], name)[0]  # evicts a2, loads a1
    assert engine.model.pool.targets(path)
    torch.testing.assert_close(got, hf_logits(case, [(ids, name)])[0], atol=ATOL, rtol=0)
