"""Every FP8 variant the runtime does not serve is refused in one line naming it, before any
weight is used; the accepted config is parsed as transformers reads it; layouts that would cut
an FP8 input dim inside a 128-column block are refused before any process group exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelora_dist.cli.main import main as cli_main
from moelora_dist.config.model import ModelConfig
from moelora_dist.config.quant import QuantConfigError, parse_quantization_config
from moelora_dist.errors import MoeloraError
from moelora_dist.engine.engine import Engine
from tests.fp8_factory import SIZES, quantize_checkpoint
from tests.hf_factory import make_model, save_model

GOOD = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
        "activation_scheme": "dynamic"}


@pytest.mark.parametrize("change,match", [
    ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
    ({"fmt": "e5m2"}, "e5m2 checkpoints are refused"),
    ({"weight_block_size": None}, "per-tensor FP8 scales are not supported"),
    ({"weight_block_size": [64, 64]}, r"weight_block_size \[64, 64\] is not supported"),
    ({"weight_block_size": [128, 64]}, r"weight_block_size \[128, 64\] is not supported"),
    ({"activation_scheme": "static"}, "activation_scheme 'static' is not supported"),
    ({"scale_fmt": "e4m3"}, "scale_fmt 'e4m3' is not supported"),
    ({"modules_to_convert": ["embed_tokens"]}, "FP8 embedding tables"),
    ({"expert_dtype": "fp4"}, "FP4 experts"),
    ({"modules_to_not_convert": "lm_head"}, "must be a list"),
    ({"dequantize": "yes"}, "dequantize 'yes' must be true or false"),
], ids=lambda v: str(v)[:30])
def test_unsupported_quantization_configs_are_refused(change, match):
    q = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(QuantConfigError, match=match):
        parse_quantization_config({"quantization_config": q})


def test_accepted_config_and_transformers_module_rule():
    assert parse_quantization_config({}) is None
    c = parse_quantization_config({"quantization_config": GOOD})
    # no modules_to_not_convert: transformers' default skip is lm_head alone
    assert not c.converts("lm_head") and c.converts("model.layers.0.self_attn.q_proj")
    c = parse_quantization_config({"quantization_config": {
        **GOOD, "scale_fmt": "ue8m0", "modules_to_not_convert": ["model.layers.1", "o_proj"]}})
    assert c.scale_fmt == "ue8m0"
    assert c.converts("lm_head")  # a given list replaces the default: it must name lm_head
    assert not c.converts("model.layers.1.mlp.experts") and c.converts("model.layers.11.mlp")
    assert not c.converts("model.layers.0.self_attn.o_proj")


@pytest.fixture
def fp8_dir(tmp_path) -> Path:
    d = save_model(make_model("qwen3_moe", **SIZES["qwen3_moe"]), tmp_path / "m")
    quantize_checkpoint(d)
    return d


def _edit(d: Path, fn) -> None:
    path = d / "model.safetensors"
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


Q = "model.layers.0.self_attn.q_proj"
E = "model.layers.1.mlp.experts.2.down_proj"


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop(f"{Q}.weight_scale_inv"), "has no .*q_proj.weight_scale_inv"),
    (lambda sd: sd.pop(f"{E}.weight_scale_inv"), "has no .*down_proj.weight_scale_inv"),
    (lambda sd: sd.update({f"{Q}.weight_scale_inv": torch.ones(())}), "a per-tensor scale"),
    (lambda sd: sd.update({f"{Q}.weight_scale_inv": torch.ones(512, 1)}),
     "per-channel .* scales"),
    (lambda sd: sd.update({f"{Q}.weight_scale_inv": torch.ones(8, 2)}), "a scale grid of shape"),
    (lambda sd: sd.update({f"{Q}.weight": sd[f"{Q}.weight"].float().to(torch.float8_e5m2)}),
     "float8_e5m2; only e4m3"),
    (lambda sd: sd.update({f"{Q}.weight_scale_inv": sd[f"{Q}.weight_scale_inv"].bfloat16()}),
     "weight_scale_inv must be float32"),
    (lambda sd: sd.update({f"{Q}.weight_scale_inv": -sd[f"{Q}.weight_scale_inv"]}),
     "non-finite or non-positive scales"),
    (lambda sd: sd.update({f"{Q}.weight": sd[f"{Q}.weight"].float()}),
     "a scale beside an unquantized weight"),
    (lambda sd: sd.update({"model.layers.0.mlp.gate.weight":
                           sd["model.layers.0.mlp.gate.weight"].to(torch.float8_e4m3fn)}),
     "mlp.gate.weight' is stored as torch.float8_e4m3fn"),
], ids=["no-scale", "no-expert-scale", "per-tensor", "per-channel", "other-block", "e5m2",
        "bf16-scale", "negative-scale", "scale-beside-fp32", "fp8-router"])
def test_unsupported_tensors_are_refused(fp8_dir, edit, match):
    _edit(fp8_dir, edit)
    with pytest.raises(MoeloraError, match=match):
        Engine.from_pretrained(str(fp8_dir), progress=False, num_pages=64)


def test_ue8m0_scales_must_be_powers_of_two(fp8_dir):
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoeloraError, match="not powers of two"):
        Engine.from_pretrained(str(fp8_dir), progress=False, num_pages=64)


def test_fp8_tensor_in_a_module_not_converted_is_refused(fp8_dir):
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = ["lm_head", "self_attn.q_proj"]
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoeloraError, match="modules_to_not_convert excludes .*q_proj"):
        Engine.from_pretrained(str(fp8_dir), progress=False, num_pages=64)


def test_fp8_layout_cut_inside_a_block_is_refused_before_any_group(fp8_dir, tmp_path,
                                                                   capsys, monkeypatch):
    """I = 256 over moe_tp = 4 (tp 4, ep 1) gives 64-column shards of down: refused, naming the
    numbers and layouts that work, before process groups (the CLI is run as a rank of a job
    that was never started: RANK is set, no group exists)."""
    from moelora_dist.models.fp8_layout import check_fp8_layout

    cfg = ModelConfig.from_dir(str(fp8_dir))
    with pytest.raises(MoeloraError) as info:
        check_fp8_layout(cfg, 4, 1)
    msg = str(info.value)
    assert "I=256 over moe_tp = tp/ep = 4/1 = 4 gives shards of 64" in msg
    assert "--tp 4 --ep 2" in msg and "--tp 4 --ep 4" in msg
    check_fp8_layout(cfg, 4, 2)  # 128-column shards: fine
    req = tmp_path / "r.jsonl"
    req.write_text('{"input_ids": [5]}\n')
    monkeypatch.setenv("RANK", "0")
    import moelora_dist.cli.common as common

    monkeypatch.setattr(common, "make_groups", lambda args: pytest.fail("groups were built"))
    rc = cli_main(["logits", "--model", str(fp8_dir), "--requests", str(req), "--out",
                   str(tmp_path / "o"), "--tp", "4", "--ep", "1", "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot split this FP8 checkpoint" in err[0]


def test_dequantize_flag_needs_an_fp8_checkpoint(tmp_path, capsys):
    d = save_model(make_model("mixtral"), tmp_path / "m")
    req = tmp_path / "r.jsonl"
    req.write_text('{"input_ids": [5]}\n')
    capsys.readouterr()
    assert cli_main(["logits", "--model", str(d), "--requests", str(req), "--out",
                     str(tmp_path / "o"), "--dequantize-fp8", "--device", "cpu"]) == 2
    assert "is not an FP8 checkpoint" in capsys.readouterr().err
