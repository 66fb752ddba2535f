"""config.json of DeepSeek-V3 / Kimi-K2, GLM-4.5 and gpt-oss: every fact the runner reads,
checked against the transformers model built from the same config (module shapes, dense
layers, shared experts, MLA dims, rotary dims, windows, biases), and the one-line refusals."""

import json

import pytest
import torch

from moelora_dist.config.families import layer_linear_shapes
from moelora_dist.config.model import ModelConfig, ModelConfigError
from tests.hf_families import FAMILIES, make_family_model, save_family_model


def _linears_of(model, layer: int) -> dict[str, tuple[int, int]]:
    """``{module: (in, out)}`` of every 2-D weight under ``model.layers.{layer}`` except the
    routed experts (3-D) and norms, read off the transformers model itself."""
    out, prefix = {}, f"model.layers.{layer}."
    for name, p in model.named_parameters():
        if not name.startswith(prefix) or not name.endswith(".weight") or p.dim() != 2:
            continue
        module = name[len(prefix):-len(".weight")]
        out[module] = (int(p.shape[1]), int(p.shape[0]))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_shapes_match_the_transformers_model(family, tmp_path):
    model = make_family_model(family)
    raw = json.loads((save_family_model(model, tmp_path) / "config.json").read_text())
    cfg = ModelConfig.from_dict(raw)
    for layer in range(cfg.num_layers):
        assert layer_linear_shapes(raw, layer) == _linears_of(model, layer), (family, layer)
    hf = model.config
    if family == "gpt_oss":
        assert cfg.moe_layers == (0, 1, 2) and cfg.shared_intermediate == 0
        assert cfg.layer_windows == (4, None, 4) and cfg.sinks and cfg.o_bias
        assert cfg.expert_layout == "interleaved" and cfg.expert_bias
        assert cfg.activation == "swiglu_oai" and cfg.swiglu_limit == 1.0
        assert cfg.router == "topk_softmax" and cfg.router_bias
        assert cfg.rope.kind == "yarn" and not cfg.rope.truncate and cfg.rope.factor == 8.0
        assert cfg.rope.rotary_dim == cfg.head_dim == 8
    else:
        assert cfg.moe_layers == (1, 2) and cfg.dense_intermediate == hf.intermediate_size
        assert cfg.shared_intermediate == hf.n_shared_experts * hf.moe_intermediate_size
        assert cfg.router == "sigmoid_grouped" and cfg.correction_bias and cfg.router_fp32
        assert (cfg.n_group, cfg.topk_group) == (hf.n_group, hf.topk_group)
        assert cfg.routed_scaling_factor == hf.routed_scaling_factor
        assert cfg.mtp_layers == 1  # num_nextn_predict_layers, written by save_pretrained
    if family == "deepseek_v3":
        assert cfg.attention == "mla" and raw["head_dim"] == 8  # = qk_rope_head_dim ...
        assert cfg.head_dim == 20 and cfg.v_head_dim == 10  # ... never used to size attention
        assert cfg.attn_out == 4 * 10 and cfg.rope.rotary_dim == 8 and cfg.rope.interleave
        assert cfg.rope.kind == "yarn" and cfg.rope.softmax_mscale() != 1.0
        assert cfg.rope.attention_factor != 1.0
    if family == "glm4_moe":
        assert cfg.qk_norm == "head" and cfg.attention_bias and cfg.o_bias is False
        assert cfg.rope.rotary_dim == 4  # partial_rotary_factor 0.5 of head_dim 8


def test_glm_partial_rotary_defaults_to_half_when_absent(tmp_path):
    from transformers import Glm4MoeConfig

    raw = json.loads((save_family_model(make_family_model("glm4_moe"), tmp_path)
                      / "config.json").read_text())
    raw["rope_parameters"].pop("partial_rotary_factor")
    raw["rope_theta"] = raw["rope_parameters"].pop("rope_theta")
    raw.pop("rope_parameters")
    assert ModelConfig.from_dict(raw).rope.rotary_dim == 4
    hf = Glm4MoeConfig(**{k: v for k, v in raw.items() if k not in ("architectures",
                                                                      "transformers_version")})
    assert hf.rope_parameters["partial_rotary_factor"] == 0.5  # transformers agrees
    assert ModelConfig.from_dict(dict(raw, partial_rotary_factor=1.0)).rope.rotary_dim == 8


def test_kimi_k2_is_deepseek_v3(tmp_path):
    raw = json.loads((save_family_model(make_family_model("deepseek_v3"), tmp_path)
                      / "config.json").read_text())
    kimi = ModelConfig.from_dict(dict(raw, model_type="kimi_k2"))
    ds = ModelConfig.from_dict(raw)
    assert kimi.arch == "deepseek_v3" and kimi.model_type == "kimi_k2"
    assert kimi == ModelConfig.from_dict(dict(raw)).__class__(**{**ds.__dict__,
                                                                 "model_type": "kimi_k2"})
    # Kimi-K2.5 nests the language model as text_config (transformers maps kimi_k2 there too)
    nested = {"model_type": "kimi_k25", "text_config": dict(raw, model_type="kimi_k2")}
    assert ModelConfig.from_dict(nested).mla == ds.mla


def test_old_style_rope_scaling_of_published_deepseek_configs():
    raw = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=8, intermediate_size=16, kv_lora_rank=8, q_lora_rank=None,
               qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, n_group=2, topk_group=1,
               first_k_dense_replace=1, rope_theta=10000, max_position_embeddings=163840,
               rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 1.0, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 4096})
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope.kind == "yarn" and cfg.rope.factor == 40 and cfg.rope.attention_factor == 1.0
    assert cfg.rope.softmax_mscale() == pytest.approx((0.1 * torch.tensor(40.).log() + 1) ** 2)
    assert cfg.mla.q_lora_rank is None and cfg.moe_layers == (1,)
    assert cfg.n_group == 2 and cfg.routed_scaling_factor == 2.5  # transformers' default
    no_first = {k: v for k, v in raw.items() if k != "first_k_dense_replace"}
    assert ModelConfig.from_dict(no_first).moe_layers == ()  # transformers' default 3 > 2


@pytest.mark.parametrize("change,message", [
    (dict(n_group=3), "n_routed_experts=8 is not divisible by n_group=3"),
    (dict(topk_group=5), r"topk_group=5 must lie in \[1, n_group=4\]"),
    (dict(num_experts_per_tok=7, topk_group=1), "exceeds the experts of the 1 kept group"),
    (dict(kv_lora_rank=None), "needs kv_lora_rank"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8}), "rope_type 'llama3'"),
    (dict(quantization_config={"quant_method": "awq"}), "quant_method .awq."),
    (dict(n_group=1.5), "'n_group' is 1.5; it must be a positive integer"),
])
def test_deepseek_config_refusals(change, message, tmp_path):
    raw = json.loads((save_family_model(make_family_model("deepseek_v3"), tmp_path)
                      / "config.json").read_text())
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_dict({**raw, **change})


def test_gpt_oss_mxfp4_is_served_other_quantizations_are_not(tmp_path):
    raw = json.loads((save_family_model(make_family_model("gpt_oss"), tmp_path)
                      / "config.json").read_text())
    q = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    assert ModelConfig.from_dict(dict(raw, quantization_config=q)).quant_method == "mxfp4"
    with pytest.raises(ModelConfigError, match="quant_method 'awq'.* MXFP4 experts are "
                                               "dequantized at load"):
        ModelConfig.from_dict(dict(raw, quantization_config={"quant_method": "awq"}))
    with pytest.raises(ModelConfigError, match="layer_types"):
        ModelConfig.from_dict(dict(raw, layer_types=["sliding_attention"]))
    # absent rope_parameters: transformers' gpt-oss default YaRN (factor 32, no truncation)
    cfg = ModelConfig.from_dict({k: v for k, v in raw.items() if k != "rope_parameters"})
    assert (cfg.rope.kind, cfg.rope.factor, cfg.rope.truncate, cfg.rope.theta) == (
        "yarn", 32.0, False, 150000.0)
