"""End to end on one process: ``moelora-dist logits`` / ``generate`` (both on the engine) on a
batch that mixes two PEFT adapters and base-only requests equals transformers+PEFT run one
request at a time.

Tolerance (fp32 on CPU): both sides do the same products in fp32 in a different order (fused
vs unfused attention, LoRA applied as a delta vs inside PEFT's parametrization), so logits of
size O(1-5) differ by ~1e-6; ``ATOL = 1e-4``. A wrong adapter, slot, scale (rsLoRA), kv head or
expert moves logits by O(0.1-1): ``test_*`` also checks the adapters change the logits by far
more than the tolerance, so a silently dropped adapter cannot pass.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moelora_dist.cli.main import main as cli_main
from moelora_dist.engine.engine import Engine
from tests.e2e_cases import (GEN_REQUESTS, REQUESTS, build_case, hf_generate, hf_logits,
                             write_requests)
from tests.hf_factory import ARCHS

ATOL = 1e-4


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory):
    return build_case(request.param, tmp_path_factory.mktemp(request.param))


def _cli_logits(case, tmp_path, *extra) -> list[torch.Tensor]:
    req = write_requests(tmp_path / "req.jsonl")
    out = tmp_path / "logits.safetensors"
    rc = cli_main(["logits", "--model", str(case.model_dir), *case.adapter_args(),
                   "--requests", str(req), "--out", str(out), "--device", "cpu", *extra])
    assert rc == 0
    tensors = load_file(str(out))
    assert sorted(tensors) == sorted(f"request_{i}" for i in range(len(REQUESTS)))
    return [tensors[f"request_{i}"] for i in range(len(REQUESTS))]


def test_logits_command_matches_hf_peft(case, tmp_path):
    ours = _cli_logits(case, tmp_path)
    ref = hf_logits(case)
    base = hf_logits(case, [(ids, None) for ids, _ in REQUESTS])
    for i, ((ids, adapter), o, r, b) in enumerate(zip(REQUESTS, ours, ref, base)):
        assert o.dtype == torch.float32 and o.shape == (len(ids), 128)
        torch.testing.assert_close(o, r, atol=ATOL, rtol=0, msg=f"request {i} ({adapter})")
        if adapter is not None:  # the adapter must matter, or this test proves nothing
            assert (r - b).abs().max() > 100 * ATOL


@pytest.mark.parametrize("budget", ["8192", "6"], ids=["one_prefill", "chunked_prefill"])
def test_generate_command_matches_hf_generate(case, tmp_path, budget):
    req = write_requests(tmp_path / "gen.jsonl", GEN_REQUESTS)
    out = tmp_path / "gen_out.jsonl"
    rc = cli_main(["generate", "--model", str(case.model_dir), *case.adapter_args(),
                   "--requests", str(req), "--out", str(out), "--device", "cpu",
                   "--max-batch-tokens", budget])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["request"] for x in lines] == list(range(len(GEN_REQUESTS)))
    assert [x["output_ids"] for x in lines] == hf_generate(case)


def test_bfloat16_logits_stay_close_to_fp32(case, tmp_path):
    # bf16 weights and activations: ~3 significant digits per op over 2 layers; the bound is
    # loose on purpose, the point is that the bf16 path runs and is not garbage (fp32 shrink).
    ours = _cli_logits(case, tmp_path, "--dtype", "bfloat16")
    for o, r in zip(ours, hf_logits(case)):
        assert (o - r).abs().max() < 0.15 * r.abs().max()


def _engine(case, max_loras, **kw):
    return Engine.from_pretrained(str(case.model_dir), max_loras=max_loras, max_rank=8,
                                  progress=False, num_pages=256, page_size=4, **kw)


def test_hybrid_dense_mlp_layers_with_lora(tmp_path, monkeypatch):
    import moelora_dist.engine.worker as worker_mod

    monkeypatch.setattr(worker_mod, "LOGITS_SLICE", 5)  # logits slices cross request borders
    case = build_case("qwen3_moe", tmp_path, hybrid=True)
    engine = _engine(case, 2)
    assert engine.model.pool.dense_buffers("layers.1.mlp.gate_proj") is not None
    for name, path in case.adapter_dirs.items():
        engine.add_adapter(name, str(path))
    assert "layers.1.mlp.up_proj" in engine.adapters.registry["a2"].dense  # dense MLP targeted
    assert 1 not in engine.adapters.registry["a2"].moe
    ours = engine.prompt_logits([ids for ids, _ in REQUESTS], [a for _, a in REQUESTS])
    for o, r in zip(ours, hf_logits(case)):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=0)


def test_adapters_load_and_unload_while_engine_lives(tmp_path):
    """One slot, two adapters: the pool swaps them between steps, and removing one makes
    its requests fail with a clear error while the other still matches HF."""
    case = build_case("mixtral", tmp_path)
    engine = _engine(case, 1)
    engine.add_adapter("a1", str(case.adapter_dirs["a1"]))
    engine.add_adapter("a2", str(case.adapter_dirs["a2"]))  # registered, not resident yet
    ref = hf_logits(case)
    for ids, adapter in REQUESTS[:3] * 2:  # alternate: every request forces a swap
        got = engine.prompt_logits([ids], adapter)[0]
        want = ref[[r[0] for r in REQUESTS].index(ids)]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    engine.remove_adapter("a1")
    with pytest.raises(ValueError, match="unknown adapter 'a1'"):
        engine.prompt_logits([[1, 2]], "a1")
    engine.add_adapter("a1", str(case.adapter_dirs["a1"]))  # and back again
    torch.testing.assert_close(engine.prompt_logits([REQUESTS[0][0]], "a1")[0], ref[0],
                               atol=ATOL, rtol=0)


def test_two_adapters_in_one_forward_need_two_slots(tmp_path):
    case = build_case("olmoe", tmp_path)
    engine = _engine(case, 1)
    for name, path in case.adapter_dirs.items():
        engine.add_adapter(name, str(path))
    # The scheduler runs at most max_loras distinct adapters per forward.
    ours = engine.prompt_logits([ids for ids, _ in REQUESTS], [a for _, a in REQUESTS])
    for o, r in zip(ours, hf_logits(case)):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=0)
