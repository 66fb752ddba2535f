"""Projections that read the same input run as one GEMM: q/k/v of attention and gate/up of a
dense MLP, for weights in the model dtype and for block-FP8 weights (values and scale rows
concatenated, ``weights_fp8.cat_rows``). One launch instead of three (or two): at decode sizes
each FP8 projection launch is a K loop of latency, whatever its N.
"""

from __future__ import annotations

import pytest
import torch

from moelora_dist.kernels.block_fp8 import naive as fp8_naive
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight, can_cat_rows, cat_rows
from moelora_dist.models import lora_linear
from moelora_dist.models.lora_linear import fuse_rows


def _fp8(n: int, k: int, seed: int) -> BlockFP8Weight:
    g = torch.Generator().manual_seed(seed)
    return fp8_naive.quantize_weight(torch.randn(n, k, generator=g))


def test_cat_rows_keeps_values_and_views_give_back_each_part():
    parts = [_fp8(256, 384, 0), _fp8(128, 384, 1), _fp8(200, 384, 2)]  # last: partial block
    fused = cat_rows(parts)
    assert fused.weight.shape == (584, 384) and fused.scale_inv.shape == (5, 3)
    want = torch.cat([fp8_naive.dequantize(p) for p in parts])
    assert torch.equal(fp8_naive.dequantize(fused), want)
    start = 0
    for p in parts:
        view = fused.row_view(start, start + p.shape[0])
        view.check()
        assert torch.equal(view.weight.view(torch.uint8), p.weight.view(torch.uint8))
        assert torch.equal(view.scale_inv, p.scale_inv)
        assert view.weight.data_ptr() == fused.weight.data_ptr() + start * 384  # a view
        start += p.shape[0]


def test_cat_rows_refuses_what_would_need_new_scales():
    a, b = _fp8(200, 256, 0), _fp8(128, 256, 1)
    assert not can_cat_rows([a, b])  # a middle part ending inside a block
    assert not can_cat_rows([_fp8(128, 256, 0), _fp8(128, 384, 1)])  # columns differ
    reblocked = BlockFP8Weight(b.weight, b.scale_inv.repeat_interleave(2, 0), 64)
    assert not can_cat_rows([b, reblocked])  # block sizes differ
    assert not can_cat_rows([])
    with pytest.raises(ValueError, match="whole blocks"):
        cat_rows([a, b])
    with pytest.raises(ValueError, match="row 64 does not start a block of 128"):
        b.row_view(64, 128)


@pytest.mark.parametrize("kind", ["bf16", "fp8", "fp8_partial", "mixed"])
def test_fuse_rows(kind):
    if kind == "bf16":
        w = {n: torch.randn(r, 64, dtype=torch.bfloat16) for n, r in (("g", 96), ("u", 32))}
    else:
        rows = (200, 128) if kind == "fp8_partial" else (256, 128)
        w = {n: _fp8(r, 256, i) for i, (n, r) in enumerate(zip("gu", rows))}
        if kind == "mixed":
            w["u"] = torch.randn(128, 256)
    before = dict(w)
    fused = fuse_rows(w, ("g", "u"), "gu")
    assert fused == (kind in ("bf16", "fp8"))
    if not fused:
        assert w == before and "gu" not in w
        return
    x = torch.randn(5, w["g"].shape[-1], dtype=torch.bfloat16 if kind == "bf16" else None)
    y = lora_linear.base_linear(x, w["gu"])
    g, u = y.split([before["g"].shape[0], before["u"].shape[0]], dim=1)
    for name, part in (("g", g), ("u", u)):
        torch.testing.assert_close(part, lora_linear.base_linear(x, before[name]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora_linear.base_linear(x, w[name]),
                                   lora_linear.base_linear(x, before[name]), rtol=0, atol=0)


def test_fp8_model_runs_one_gemm_for_qkv_and_for_gate_up(tmp_path, monkeypatch):
    """An FP8 checkpoint with 128-dim heads: two FP8 GEMMs per attention layer (q/k/v, o)
    and two per dense MLP (gate/up, down); its logits equal the unfused model's."""
    from moelora_dist.config.model import ModelConfig
    from moelora_dist.engine.engine import Engine
    from moelora_dist.models import attention, mlp
    from tests.fp8_factory import build_fp8_case

    case = build_fp8_case("qwen3_moe", tmp_path, hybrid=True, references=False)
    cfg = ModelConfig.from_dir(str(case.model_dir))

    def engine():
        return Engine.from_pretrained(str(case.model_dir), max_loras=2, max_rank=8,
                                      progress=False, model_config=cfg, num_pages=64)

    ids = [[3, 17, 5, 9, 22], [8, 1]]
    fused_engine = engine()
    model = fused_engine.model
    assert all(layer["attn"].fused and "qkv_proj" in layer["attn"].w for layer in model.layers)
    dense = [layer["mlp"] for layer in model.layers if "mlp" in layer]
    assert dense and all(m.fused and "gate_up_proj" in m.w for m in dense)
    assert isinstance(model.layers[0]["attn"].w["qkv_proj"], BlockFP8Weight)

    calls = []
    real = fp8_naive.block_fp8_linear
    monkeypatch.setattr(lora_linear.fp8_naive, "block_fp8_linear",
                        lambda x, w, b=None: calls.append(w.weight.data_ptr()) or real(x, w, b))

    def launches(model, run):
        """Names of the FP8 GEMMs one call of ``run`` launched, and how many forwards."""
        names = {}  # a fused weight first: its first part's view starts where it starts
        for layer in model.layers:
            mods = [("attn", layer["attn"].w)] + ([("mlp", layer["mlp"].w)]
                                                  if "mlp" in layer else [])
            for mod, w in mods:
                for n in ("qkv_proj", "gate_up_proj", "o_proj", "down_proj", "q_proj",
                          "k_proj", "v_proj", "gate_proj", "up_proj"):
                    if isinstance(w.get(n), BlockFP8Weight):
                        names.setdefault(w[n].weight.data_ptr(), f"{mod}.{n}")
        calls.clear()
        out = run()
        return [names.get(c, "other") for c in calls], out

    L = cfg.num_layers
    got, fused_logits = launches(model, lambda: fused_engine.prompt_logits(ids, [None, None]))
    forwards = got.count("attn.qkv_proj") // L
    assert forwards >= 1 and got.count("attn.qkv_proj") == forwards * L
    assert got.count("attn.o_proj") == forwards * L
    assert got.count("mlp.gate_up_proj") == forwards * len(dense)
    assert set(got) == {"attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}

    # The same checkpoint with the fusion turned off: three launches for q/k/v and two for
    # gate/up, and the same logits (the reference computes every output column alike).
    monkeypatch.setattr(attention, "fuse_rows", lambda *a: False)
    monkeypatch.setattr(mlp, "fuse_rows", lambda *a: False)
    plain = engine()
    assert not plain.model.layers[0]["attn"].fused
    got_plain, plain_logits = launches(plain.model,
                                       lambda: plain.prompt_logits(ids, [None, None]))
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert got_plain.count(f"attn.{n}") == forwards * L
    for n in ("gate_proj", "up_proj", "down_proj"):
        assert got_plain.count(f"mlp.{n}") == forwards * len(dense)
    assert len(got_plain) - len(got) == forwards * (2 * L + len(dense))
    for a, b in zip(fused_logits, plain_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mla_runs_one_gemm_for_q_a_and_kv_a(monkeypatch):
    """DeepSeek-V3's MLA (tiny, fp32 reference backend): q_a and kv_a_proj_with_mqa, which
    read the same x, are one GEMM (``w["qkv_a_proj"]``); one base GEMM fewer per attention
    layer than with the fusion off, and the same hidden states."""
    from moelora_dist.config.model import ModelConfig
    from moelora_dist.models import mla
    from moelora_dist.models.model import MoELoRAModel
    from moelora_dist.models.weights import RandomWeights
    from moelora_dist.parallel.groups import ParallelGroups
    from tests.family_configs import RAW
    from tests.unit.test_kernels_fused_expand import _decode_step

    cfg = ModelConfig.from_dict(RAW["deepseek_v3"])
    dev = torch.device("cpu")

    def build():
        return MoELoRAModel.build(cfg, ParallelGroups.single(dev),
                                  RandomWeights(cfg, torch.float32, dev, std=0.2),
                                  dtype=torch.float32, max_loras=2, max_rank=8,
                                  progress=False, max_positions=64)

    calls = []
    real = mla.base_linear
    monkeypatch.setattr(mla, "base_linear",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = build()
    assert all(layer["attn"].fused and "qkv_a_proj" in layer["attn"].w
               for layer in fused.layers)
    want = _decode_step(cfg, fused, [-1, -1])
    n_fused = len(calls)
    monkeypatch.setattr(mla, "fuse_rows", lambda *a: False)
    calls.clear()
    plain = build()
    got = _decode_step(cfg, plain, [-1, -1])
    assert len(calls) - n_fused == cfg.num_layers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
