"""Every refusal of load_adapter, each asserting that the message names what is wrong.

Legend: E experts, H hidden, I expert intermediate, r rank.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from moelora_dist.adapters import AdapterError, load_adapter
from tests.hf_factory import lora_config_dict, write_adapter

P = "base_model.model.model.layers"
E, H, I, r = 4, 32, 24, 4
MODEL_CONFIG = {"hidden_size": H, "moe_intermediate_size": I, "num_experts": E,
                "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8,
                "num_key_value_heads": 2}


def _stacked(layer=0, e=E, h=H, i=I, rank=r, scale=1.0):
    gen = torch.Generator().manual_seed(layer)
    t = {}
    for name, din, dout in (("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)):
        t[f"{P}.{layer}.mlp.experts.{name}.lora_A.weight"] = torch.randn(e, rank, din, generator=gen) * scale
        t[f"{P}.{layer}.mlp.experts.{name}.lora_B.weight"] = torch.randn(e, dout, rank, generator=gen)
    return t


def _write(tmp_path, tensors, **cfg):
    return write_adapter(tmp_path, tensors, lora_config_dict(**{"r": r, "alpha": 8, **cfg}))


def test_pickled_weights_are_refused_without_unpickling(tmp_path, monkeypatch):
    (tmp_path / "adapter_config.json").write_text(json.dumps(lora_config_dict()))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")

    def no_unpickle(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickle)
    with pytest.raises(AdapterError, match=r"only pickled weights \(adapter_model\.bin\); they are "
                                           r"never unpickled"):
        load_adapter(tmp_path)


def test_missing_config(tmp_path):
    write_adapter(tmp_path, _stacked(), config=None)
    with pytest.raises(AdapterError, match=r"missing adapter_config\.json"):
        load_adapter(tmp_path)


def test_missing_weights_and_not_a_directory(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(lora_config_dict()))
    with pytest.raises(AdapterError, match=r"missing adapter_model\.safetensors"):
        load_adapter(tmp_path)
    with pytest.raises(AdapterError, match="not a directory"):
        load_adapter(tmp_path / "adapter_config.json")


@pytest.mark.parametrize("field,value,needle", [
    ("hidden_size", 48, r"layer 0, key '.*experts\.gate_proj\.lora_A\.weight': shape mismatch for "
                        r"lora_A of the gate projection .*expected \[4 or 1, 4, 48\], found \[4, 4, 32\]"),
    ("moe_intermediate_size", 16, r"layer 0, key '.*experts\.gate_proj\.lora_B\.weight': shape "
                                  r"mismatch for lora_B of the gate projection .*expected \[4 or 1, 16, 4\], found \[4, 24, 4\]"),
])
def test_shape_mismatch_against_model_config(tmp_path, field, value, needle):
    _write(tmp_path, _stacked())
    with pytest.raises(AdapterError, match=needle) as info:
        load_adapter(tmp_path, model_config={**MODEL_CONFIG, field: value})
    assert "adapter_model.safetensors" in str(info.value)


def test_rank_zero_in_config_and_in_tensor(tmp_path):
    _write(tmp_path / "cfg", _stacked(), r=0)
    with pytest.raises(AdapterError, match=r"r=0; the LoRA rank must be a positive integer"):
        load_adapter(tmp_path / "cfg")
    _write(tmp_path / "pattern", _stacked(), rank_pattern={"down_proj": 0})
    with pytest.raises(AdapterError, match=r"rank_pattern\['down_proj'\]=0"):
        load_adapter(tmp_path / "pattern")
    _write(tmp_path / "tensor", {**_stacked(layer=0), **_stacked(layer=1, rank=0)})
    with pytest.raises(AdapterError, match=r"layer 1, key '.*layers\.1\.mlp\.experts\.down_proj"
                                           r"\.lora_A\.weight': rank 0"):
        load_adapter(tmp_path / "tensor")


def test_rank_above_max_rank(tmp_path):
    _write(tmp_path, _stacked(rank=8), r=8)
    with pytest.raises(AdapterError, match=r"layer 0, key '.*gate_proj\.lora_A\.weight': rank 8 of "
                                           r"the gate projection exceeds the pool's max rank 4"):
        load_adapter(tmp_path, max_rank=4)
    assert load_adapter(tmp_path, max_rank=8).max_rank == 8


def test_rank_in_config_disagrees_with_tensor(tmp_path):
    _write(tmp_path, _stacked(rank=4), r=8)
    with pytest.raises(AdapterError, match=r"gives rank 8 for module 'model\.layers\.0\.mlp\.experts"
                                           r"\.down_proj' \(r / rank_pattern\) but the tensor has rank 4"):
        load_adapter(tmp_path)


def test_expert_count_mismatch(tmp_path):
    _write(tmp_path / "model", _stacked(e=3))
    with pytest.raises(AdapterError, match=r"layer 0, key '.*down_proj\.lora_A\.weight': expert count "
                                           r"mismatch: stacked lora_A has 3 experts, expected 4"):
        load_adapter(tmp_path / "model", model_config=MODEL_CONFIG)
    t = _stacked()
    t[f"{P}.0.mlp.experts.down_proj.lora_B.weight"] = torch.randn(3, H, r)
    _write(tmp_path / "inner", t)
    with pytest.raises(AdapterError, match=r"expert count mismatch: stacked lora_B has 3 experts, "
                                           r"expected 4"):
        load_adapter(tmp_path / "inner")
    _write(tmp_path / "layers", {**_stacked(layer=0), **_stacked(layer=1, e=2)})
    with pytest.raises(AdapterError, match=r"expert count mismatch between layers: \{0: 4, 1: 2\}"):
        load_adapter(tmp_path / "layers")
    per = {f"{P}.0.mlp.experts.{e}.gate_proj.lora_{f}.weight": torch.ones(r, H) if f == "A"
           else torch.ones(I, r) for e in (0, 5) for f in "AB"}
    _write(tmp_path / "index", per)
    with pytest.raises(AdapterError, match=r"experts\.5\.gate_proj.*expert index 5 but the model has 4"):
        load_adapter(tmp_path / "index", model_config=MODEL_CONFIG)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused(tmp_path, bad):
    t = _stacked()
    t[f"{P}.0.mlp.experts.up_proj.lora_B.weight"][2, 3, 1] = bad
    _write(tmp_path, t)
    kind = "1 NaN and 0 Inf" if math.isnan(bad) else "0 NaN and 1 Inf"
    with pytest.raises(AdapterError, match=rf"key '.*layers\.0\.mlp\.experts\.up_proj\.lora_B\.weight': "
                                           rf"{kind} values"):
        load_adapter(tmp_path)


def test_unknown_keys_strict_and_opt_out(tmp_path):
    t = _stacked()
    t[f"{P}.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(H)  # DoRA
    t[f"{P}.0.mlp.experts.0.gate_proj.lora_A.bias"] = torch.ones(r)
    t[f"{P}.0.mlp.experts.router.lora_A.weight"] = torch.ones(r, H)  # under experts: never "dense"
    _write(tmp_path, t)
    with pytest.raises(AdapterError, match=r"3 key\(s\) that are not LoRA factors .*lora_magnitude_vector"
                                           r".*--no-strict.*strict=False in the API"):
        load_adapter(tmp_path)
    with pytest.warns(UserWarning, match=r"3 key\(s\).*experts\.router\.lora_A\.weight.*ignored"):
        got = load_adapter(tmp_path, strict=False)
    assert sorted(got.moe) == [0] and not got.dense


def test_missing_factor_and_mixed_styles(tmp_path):
    t = _stacked()
    del t[f"{P}.0.mlp.experts.up_proj.lora_B.weight"]
    _write(tmp_path / "missing", t)
    with pytest.raises(AdapterError, match=r"layer 0, key '.*up_proj\.lora_A\.weight': lora_B of "
                                           r"this projection is missing"):
        load_adapter(tmp_path / "missing")
    t = _stacked()
    t[f"{P}.0.mlp.experts.1.gate_proj.lora_A.weight"] = torch.ones(r, H)
    _write(tmp_path / "mixed", t)
    with pytest.raises(AdapterError, match="both a stacked lora_A and per-expert lora_A keys"):
        load_adapter(tmp_path / "mixed")


def test_unsupported_peft_options_and_models(tmp_path):
    _write(tmp_path / "dora", _stacked(), use_dora=True)
    with pytest.raises(AdapterError, match=r"use_dora=true is not supported"):
        load_adapter(tmp_path / "dora")
    # gpt-oss's interleaved experts are served now (tests/unit/test_adapters_families.py);
    # what stays refused there is the one layout whose row order is ambiguous.
    t = _stacked()
    g, u = f"{P}.0.mlp.experts.gate_proj", f"{P}.0.mlp.experts.up_proj"
    t[f"{P}.0.mlp.experts.gate_up_proj.lora_A.weight"] = t.pop(f"{g}.lora_A.weight")
    del t[f"{u}.lora_A.weight"]  # one A for gate and up, B rows [gate | up]
    t[f"{P}.0.mlp.experts.gate_up_proj.lora_B.weight"] = torch.cat(
        [t.pop(f"{g}.lora_B.weight"), t.pop(f"{u}.lora_B.weight")], dim=1)
    _write(tmp_path / "ok", t)
    with pytest.raises(AdapterError, match=r"gate_up_proj LoRA .* gpt-oss's interleaved experts"):
        load_adapter(tmp_path / "ok", model_config={**MODEL_CONFIG, "model_type": "gpt_oss"})


def test_layer_checks_against_model(tmp_path):
    _write(tmp_path / "range", _stacked(layer=2))
    with pytest.raises(AdapterError, match=r"layer 2: the model has only 2 layers"):
        load_adapter(tmp_path / "range", model_config=MODEL_CONFIG)
    _write(tmp_path / "dense", _stacked(layer=1))
    with pytest.raises(AdapterError, match=r"layer 1: expert LoRA on a layer that is dense"):
        load_adapter(tmp_path / "dense", model_config={**MODEL_CONFIG, "mlp_only_layers": [1]})


def test_target_parameters_config_and_weights_disagree(tmp_path):
    t = {f"{P}.0.mlp.experts.lora_A.weight": torch.ones(r * E, I),
         f"{P}.0.mlp.experts.lora_B.weight": torch.ones(H, r * E)}
    _write(tmp_path / "none", t, target_parameters=["self_attn.q_proj.weight"])
    with pytest.raises(AdapterError, match=r"names neither of \('gate_up_proj', 'down_proj'\)"):
        load_adapter(tmp_path / "none")
    _write(tmp_path / "depth", t, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with pytest.raises(AdapterError, match=r"imply wrapper depths \[0, 1\] .* but the file has \[0\]"):
        load_adapter(tmp_path / "depth")
    _write(tmp_path / "shape", t, target_parameters=["mlp.experts.gate_up_proj"])
    with pytest.raises(AdapterError, match=r"shape mismatch: .*fit neither orientation; expected "
                                           r"\{'gate_up_proj': 'lora_A \[r\*E, 32\], lora_B \[48, r\*E\]'\}"):
        load_adapter(tmp_path / "shape", model_config=MODEL_CONFIG)
