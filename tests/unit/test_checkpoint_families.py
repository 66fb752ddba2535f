"""Checkpoints of the families: DeepSeek-V3's fused 3-D expert keys next to the per-expert
ones transformers writes, its multi-token-prediction layer keys ignored with a log line (and
nothing else), gpt-oss's MXFP4 experts dequantized at load (against transformers' own
dequantizer) with the memory cost logged, and sliced MXFP4 reads on MoE-TP ranks.

fp32 on CPU; logits against transformers with ``ATOL = 1e-4`` (tests/unit/test_e2e_families.py).
"""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelora_dist.config.model import ModelConfigError
from moelora_dist.files.safetensors_io import SafetensorsReader
from moelora_dist.models.mxfp4 import dequantize_mxfp4, read_mxfp4
from tests.e2e_families import family_engine
from tests.hf_families import make_family_model, save_family_model

ATOL = 1e-4
PROMPT = [3, 4, 5, 6, 7, 8, 9, 10, 11]


def _logits(model_dir):
    return family_engine(model_dir, max_rank=4).prompt_logits([PROMPT])[0]


def _hf(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([PROMPT])).logits[0]


def _rewrite(model_dir, fn):
    path = model_dir / "model.safetensors"
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


def test_deepseek_fused_expert_keys(tmp_path):
    model = make_family_model("deepseek_v3")
    d = save_family_model(model, tmp_path)

    def fuse(t):
        for layer in (1, 2):
            p = f"model.layers.{layer}.mlp.experts"
            gu = [torch.cat([t.pop(f"{p}.{e}.gate_proj.weight"), t.pop(f"{p}.{e}.up_proj.weight")])
                  for e in range(8)]
            t[f"{p}.gate_up_proj"] = torch.stack(gu)
            t[f"{p}.down_proj"] = torch.stack([t.pop(f"{p}.{e}.down_proj.weight")
                                               for e in range(8)])
    _rewrite(d, fuse)
    torch.testing.assert_close(_logits(d), _hf(model), atol=ATOL, rtol=0)


def test_mtp_layer_keys_are_ignored_with_a_log_line(tmp_path, caplog):
    model = make_family_model("deepseek_v3")
    d = save_family_model(model, tmp_path)
    # DeepSeek-V3 publishes its MTP module as one more decoder layer (model.layers.61 of 61)
    mtp = {"model.layers.3.eh_proj.weight": torch.randn(32, 64),
           "model.layers.3.enorm.weight": torch.ones(32),
           "model.layers.3.shared_head.head.weight": torch.randn(128, 32),
           "model.layers.3.mlp.experts.0.gate_proj.weight": torch.randn(24, 32)}
    _rewrite(d, lambda t: t.update(mtp))
    with caplog.at_level(logging.INFO, logger="moelora_dist.models.weights"):
        got = _logits(d)
    torch.testing.assert_close(got, _hf(model), atol=ATOL, rtol=0)
    assert "4 tensor(s) of the 1 multi-token-prediction layer(s) model.layers.3.* ignored" \
        in caplog.text
    # only the MTP layers: a tensor past them is refused as before
    _rewrite(d, lambda t: t.update({"model.layers.4.eh_proj.weight": torch.randn(32, 64)}))
    with pytest.raises(ModelConfigError, match=r"does not place: \['model.layers.4.eh_proj"):
        _logits(d)


def _random_mxfp4(E, O, C, g):
    blocks = torch.randint(0, 256, (E, O, C // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(121, 128, (E, O, C // 32), generator=g, dtype=torch.uint8)
    return blocks, scales


def test_dequantize_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks, scales = _random_mxfp4(3, 40, 64, g)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, C, O]
    got = dequantize_mxfp4(blocks, scales, torch.float32)  # [E, O, C]
    assert torch.equal(got, want.transpose(1, 2))
    bf16 = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    assert torch.equal(bf16.float(), got)  # exact in bf16: FP4 value x power of two


def test_gpt_oss_mxfp4_experts_are_dequantized_at_load(tmp_path, caplog):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model = make_family_model("gpt_oss", intermediate_size=32)  # MXFP4 groups of 32 inputs
    d = save_family_model(model, tmp_path)
    g = torch.Generator().manual_seed(1)
    q = {}
    with torch.no_grad():
        for layer in range(3):
            experts = model.model.layers[layer].mlp.experts
            for name, (O, C) in (("gate_up_proj", (64, 32)), ("down_proj", (32, 32))):
                blocks, scales = _random_mxfp4(4, O, C, g)
                getattr(experts, name).copy_(convert_moe_packed_tensors(blocks, scales,
                                                                        dtype=torch.float32))
                p = f"model.layers.{layer}.mlp.experts.{name}"
                q[f"{p}_blocks"], q[f"{p}_scales"] = blocks, scales

    def quantize(t):
        for k in [k for k in t if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            del t[k]
        t.update(q)
    _rewrite(d, quantize)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"]}
    (d / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.INFO, logger="moelora_dist.models.model"):
        got = _logits(d)
    torch.testing.assert_close(got, _hf(model), atol=ATOL, rtol=0)
    assert "MXFP4 experts dequantized to float32 at load" in caplog.text


def test_mxfp4_sliced_reads_on_moe_tp_ranks(tmp_path):
    """A rank's I slice of down (input columns) need not start on a 32-group: the covering
    groups are read and cut; gate_up's interleaved rows are cut directly."""
    g = torch.Generator().manual_seed(2)
    blocks, scales = _random_mxfp4(4, 24, 96, g)
    save_file({"w_blocks": blocks, "w_scales": scales}, str(tmp_path / "m.safetensors"))
    full = dequantize_mxfp4(blocks, scales, torch.float32)
    with SafetensorsReader(tmp_path / "m.safetensors") as r:
        for lo, hi in ((0, 48), (48, 96), (20, 44), (30, 31)):
            got = read_mxfp4(r, "w", slice(1, 3), slice(5, 17), (lo, hi), (4, 24, 96),
                             torch.float32)
            assert torch.equal(got, full[1:3, 5:17, lo:hi])


@pytest.mark.parametrize("dequantize", [True, False], ids=["dequantized", "fp8_runtime"])
def test_deepseek_block_fp8_checkpoint(tmp_path, dequantize, monkeypatch):
    """The published DeepSeek-V3 / Kimi-K2 format: block-FP8 linears (MLA's five, the shared
    experts, the dense MLP, every expert; router and norms unquantized) with
    ``weight_scale_inv``. Dequantized at load it is exactly its fp32 twin (atol 1e-4 as
    above). On the FP8 runtime the base products read their inputs quantized per token and
    128 columns: the reference is transformers on the twin with that quantization simulated
    on the same linears (tests/fp8_factory.install_fake_quant), compared by the FP8 rule of
    tests/fp8_checks.py (e4m3 rounding flips)."""
    from tests import fp8_factory
    from tests.e2e_families import FAMILY_REQUESTS
    from tests.fp8_checks import assert_fp8_close

    model = make_family_model("deepseek_v3")
    d = save_family_model(model, tmp_path / "m")
    mla = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
    quantized = mla + ("o_proj", "gate_proj", "up_proj", "down_proj")

    def to_fp8(t):
        for k in [k for k in t if k.endswith(".weight") and k.split(".")[-2] in quantized]:
            t[k], t[k[:-len("weight")] + "weight_scale_inv"] = fp8_factory.quantize_blocks(t[k])
    _rewrite(d, to_fp8)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic", "dequantize": dequantize}
    (d / "config.json").write_text(json.dumps(cfg))
    twin = fp8_factory.write_dequantized_twin(d, tmp_path / "twin")
    prompts = [ids for ids, _ in FAMILY_REQUESTS]
    got = family_engine(d, max_rank=4).prompt_logits(prompts)
    if dequantize:
        for p, o in zip(prompts, got):
            torch.testing.assert_close(o, _logits_of(twin, p), atol=ATOL, rtol=0)
        return
    monkeypatch.setattr(fp8_factory, "QUANTIZED", fp8_factory.QUANTIZED + mla)
    ref = fp8_factory.install_fake_quant(fp8_factory.load_reference(twin, None))
    with torch.no_grad():
        want = [ref(input_ids=torch.tensor([p])).logits[0] for p in prompts]
    assert_fp8_close(got, want)


def _logits_of(model_dir, prompt):
    return family_engine(model_dir, max_rank=4).prompt_logits([prompt])[0]
