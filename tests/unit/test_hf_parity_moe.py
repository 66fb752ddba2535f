"""Real outside reference: HF transformers-5 MoE blocks with real PEFT LoRA vs moelora_dist.

For tiny random Qwen3-MoE, Mixtral and OLMoE models (tests/hf_factory.py), attach a PEFT LoRA
(``target_parameters`` on the experts, ``target_modules`` on attention), save it, load it with
``load_adapter``, and compare the HF MoE block (PEFT active) on a random input with
``moe.reference.route`` + ``experts_reference`` on MERGED weights ``W[e] + delta(e)``.

Tolerance (fp32): both sides compute the same products in fp32, but in a different order (PEFT
adds its delta inside a parametrization, we merge first; index_add vs our loop), so results
differ by a few ulps of O(1) values: ``atol = rtol = 1e-5``. A wrong factor orientation, expert
order, gate/up split or scale moves the output by O(0.1-1) (checked by ``base_gap`` below).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from moelora_dist.adapters import load_adapter
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.moe.router import route
from tests.hf_factory import (
    ARCHS,
    ATTENTION_MODULES,
    EXPERT_PARAMETERS,
    expert_intermediate,
    make_model,
    make_peft_adapter,
    moe_block,
    num_experts,
    save_model,
    saved_expert_key_layout,
    unwrapped_experts,
)

ATOL = RTOL = 1e-5


def _renormalize(config) -> bool:
    # Mixtral always renormalizes the top-k weights; Qwen3-MoE and OLMoE follow norm_topk_prob.
    return True if config.model_type == "mixtral" else bool(config.norm_topk_prob)


def _merged_reference(block, layer_lora, config, x_TH):
    """Our side: route like HF, then the reference experts on W[e] + delta(e) (fp32)."""
    experts = unwrapped_experts(block)
    w_gate_up = experts.gate_up_proj.detach().clone()  # [E, 2I, H]
    w_down = experts.down_proj.detach().clone()  # [E, H, I]
    I = expert_intermediate(config)
    if layer_lora is not None:
        for e in range(w_gate_up.shape[0]):
            if layer_lora.gate is not None:
                w_gate_up[e, :I] += layer_lora.gate.delta(e)
            if layer_lora.up is not None:
                w_gate_up[e, I:] += layer_lora.up.delta(e)
            if layer_lora.down is not None:
                w_down[e] += layer_lora.down.delta(e)
    logits_TE = x_TH @ block.gate.weight.detach().T
    weights_TK, ids_TK = route(logits_TE, config.num_experts_per_tok, _renormalize(config))
    return experts_reference(x_TH, w_gate_up, w_down, weights_TK, ids_TK)


VARIANTS = {
    # id: (make_peft_adapter kwargs, projections expected in every MoE layer)
    "both-params+attention": (dict(target_parameters=EXPERT_PARAMETERS,
                                   target_modules=ATTENTION_MODULES), ("gate", "up", "down")),
    "gate_up-only": (dict(target_parameters=["mlp.experts.gate_up_proj"]), ("gate", "up")),
    "down-only": (dict(target_parameters=["mlp.experts.down_proj"]), ("down",)),
    "rslora+patterns": (dict(target_parameters=EXPERT_PARAMETERS, use_rslora=True, r=8, alpha=6),
                        ("gate", "up", "down")),
    # PEFT 0.21 rewrites v4-style target_modules on experts into target_parameters, with
    # rank 2r / alpha 2*alpha on the fused gate_up (rank_pattern ".*\\.gate_up_proj").
    "target_modules-on-experts": (dict(target_modules="EXPERT_MODULES"), ("gate", "up", "down")),
    "rank+alpha-pattern": (dict(target_parameters=EXPERT_PARAMETERS,
                                rank_pattern={"layers.1.mlp.experts.down_proj": 2,
                                              "gate_up_proj": 6},
                                alpha_pattern={"model.layers.0.mlp.experts.down_proj": 3}),
                           ("gate", "up", "down")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_moe_block_matches_hf_peft(arch, variant, tmp_path):
    kwargs, projections = VARIANTS[variant]
    if kwargs.get("target_modules") == "EXPERT_MODULES":
        names = saved_expert_key_layout(arch)[1]
        kwargs = dict(target_modules=[names["gate"], names["up"], names["down"]])
    model = make_model(arch, seed=0)
    config = model.config
    model_config = config.to_dict()
    peft_model = make_peft_adapter(model, tmp_path / "lora", **{"r": 4, "alpha": 8, "seed": 1,
                                                                **kwargs})
    adapter = load_adapter(tmp_path / "lora", model_config=model_config)
    assert sorted(adapter.moe) == [0, 1]
    gen = torch.Generator().manual_seed(7)
    x_TH = torch.randn(24, config.hidden_size, generator=gen)
    for layer in (0, 1):
        lora = adapter.moe[layer]
        assert tuple(lora.projections()) == projections
        if variant == "target_modules-on-experts":
            assert lora.gate.rank == 8 and lora.gate.scaling == 2.0 and lora.down.rank == 4
        block = moe_block(peft_model, layer)
        with torch.no_grad():
            y_hf = block(x_TH[None])[0]
            ours = _merged_reference(block, lora, config, x_TH)
            base_gap = (_merged_reference(block, None, config, x_TH) - y_hf).abs().max()
        torch.testing.assert_close(ours, y_hf, atol=ATOL, rtol=RTOL)
        assert base_gap > 1e-2, "the LoRA must change the output, else this test proves nothing"


def test_pattern_and_rslora_scales_match_peft(tmp_path):
    """The scale of every expert parameter equals the one PEFT computed for it."""
    for kwargs in (VARIANTS["rslora+patterns"][0], VARIANTS["rank+alpha-pattern"][0]):
        model = make_model("qwen3_moe")
        peft_model = make_peft_adapter(model, tmp_path / "a", **{"r": 4, "alpha": 8, "seed": 1, **kwargs})
        adapter = load_adapter(tmp_path / "a", model_config=model.config.to_dict())
        for layer in (0, 1):
            wrapper = moe_block(peft_model, layer).experts
            seen = {}
            while hasattr(wrapper, "parameter_name"):
                seen[wrapper.parameter_name] = (wrapper.r["default"], wrapper.scaling["default"])
                wrapper = wrapper.base_layer
            lora = adapter.moe[layer]
            assert (lora.gate.rank, lora.gate.scaling) == pytest.approx(seen["gate_up_proj"])
            assert (lora.down.rank, lora.down.scaling) == pytest.approx(seen["down_proj"])
    assert adapter.moe[1].down.rank == 2 and adapter.moe[0].gate.rank == 6
    assert adapter.moe[0].down.scaling == pytest.approx(3 / 4)


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path):
    model = make_model("olmoe")
    make_peft_adapter(model, tmp_path / "a", r=16, alpha=8, use_rslora=True,
                      target_parameters=EXPERT_PARAMETERS, seed=2)
    adapter = load_adapter(tmp_path / "a", model_config=model.config.to_dict())
    assert adapter.moe[0].down.scaling == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_lora_delta_matches_peft(arch, tmp_path):
    model = make_model(arch)
    peft_model = make_peft_adapter(model, tmp_path / "a", target_modules=ATTENTION_MODULES, seed=3)
    adapter = load_adapter(tmp_path / "a", model_config=model.config.to_dict())
    assert adapter.format == "dense-only" and not adapter.moe
    assert sorted(adapter.dense) == sorted(f"layers.{l}.self_attn.{m}" for l in (0, 1)
                                           for m in ATTENTION_MODULES)
    for path, factors in adapter.dense.items():
        module = peft_model.base_model.model.get_submodule("model." + path)
        torch.testing.assert_close(factors.delta(0), module.get_delta_weight("default"),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_writes_per_expert_keys(arch, tmp_path):
    """docs/design.md section 5 and docs/adapters.md: transformers 5 saves the 3-D experts back as per-expert 2-D keys."""
    model = make_model(arch)
    save_model(model, tmp_path)
    block, names = saved_expert_key_layout(arch)
    E, I, H = num_experts(model.config), expert_intermediate(model.config), model.config.hidden_size
    experts = unwrapped_experts(moe_block(model, 0))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for e in range(E):
            gate = f.get_tensor(f"model.layers.0.{block}.experts.{e}.{names['gate']}.weight")
            up = f.get_tensor(f"model.layers.0.{block}.experts.{e}.{names['up']}.weight")
            down = f.get_tensor(f"model.layers.0.{block}.experts.{e}.{names['down']}.weight")
            assert gate.shape == up.shape == (I, H) and down.shape == (H, I)
            # gate rows first, then up rows, in the in-memory gate_up_proj
            torch.testing.assert_close(experts.gate_up_proj[e].detach(), torch.cat([gate, up]))
            torch.testing.assert_close(experts.down_proj[e].detach(), down)
    assert not any("gate_up_proj" in k for k in keys)
    assert json.loads((tmp_path / "config.json").read_text())["hidden_size"] == H


def test_peft_target_parameter_key_layout(tmp_path):
    """docs/adapters.md: the facts about what PEFT writes, checked on the real thing."""
    model = make_model("qwen3_moe")
    E, I, H, r = 4, expert_intermediate(model.config), model.config.hidden_size, 4
    make_peft_adapter(model, tmp_path / "both", r=r, target_parameters=EXPERT_PARAMETERS)
    with safe_open(str(tmp_path / "both" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys() if ".layers.0." in k}
    prefix = "base_model.model.model.layers.0.mlp.experts."
    assert shapes == {
        prefix + "base_layer.lora_A.weight": (r * E, H), prefix + "base_layer.lora_B.weight": (2 * I, r * E),
        prefix + "lora_A.weight": (r * E, I), prefix + "lora_B.weight": (H, r * E),
    }
    for only in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        model = make_model("qwen3_moe")
        make_peft_adapter(model, tmp_path / only, r=r, target_parameters=[only])
        with safe_open(str(tmp_path / only / "adapter_model.safetensors"), "pt") as f:
            keys = {k for k in f.keys() if ".layers.0." in k}
        # one targeted parameter lands under experts.lora_* whichever it is
        assert keys == {prefix + "lora_A.weight", prefix + "lora_B.weight"}


@pytest.mark.parametrize("arch", ARCHS)
def test_v4_per_expert_adapter_through_peft_conversion(arch, tmp_path):
    """A transformers-4 style per-expert adapter (what PEFT wrote before the experts became 3-D
    parameters; Mixtral names w1/w3/w2) is loaded by real PEFT into the transformers-5 model,
    which converts it. Our per-expert reading must give the HF+PEFT block output, and PEFT's
    re-saved v5 file (rank 2r fused gate_up, block-diagonal B) the same deltas, split back
    into gate and up LoRAs of rank r."""
    from peft import PeftModel

    from tests.hf_factory import lora_config_dict, write_adapter

    model = make_model(arch)
    config = model.config
    E, I, H, r = num_experts(config), expert_intermediate(config), config.hidden_size, 4
    block_name, names = saved_expert_key_layout(arch)
    gen = torch.Generator().manual_seed(11)
    t = {}
    for layer in (0, 1):
        for e in range(E):
            for proj, din, dout in (("gate", H, I), ("up", H, I), ("down", I, H)):
                pre = f"base_model.model.model.layers.{layer}.{block_name}.experts.{e}.{names[proj]}"
                t[f"{pre}.lora_A.weight"] = torch.randn(r, din, generator=gen) * 0.3
                t[f"{pre}.lora_B.weight"] = torch.randn(dout, r, generator=gen) * 0.3
    write_adapter(tmp_path / "v4", t, lora_config_dict(r=r, alpha=8, target_modules=list(names.values())))
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "v4")).eval()
    peft_model.save_pretrained(str(tmp_path / "v5"))
    v4 = load_adapter(tmp_path / "v4", model_config=config.to_dict())
    v5 = load_adapter(tmp_path / "v5", model_config=config.to_dict())
    assert v4.format.endswith("per-expert") and v5.format == "peft-target-parameters"
    assert json.loads((tmp_path / "v5" / "adapter_config.json").read_text())["rank_pattern"] == {
        r".*\.gate_up_proj": 2 * r}
    assert v4.moe[0].gate.rank == r and v5.moe[0].gate.rank == r  # block-diagonal B split back
    assert not v5.moe[0].gate_up_shared_a
    x_TH = torch.randn(24, H, generator=gen)
    for layer in (0, 1):
        for proj in ("gate", "up", "down"):
            for e in range(E):
                torch.testing.assert_close(getattr(v5.moe[layer], proj).delta(e),
                                           getattr(v4.moe[layer], proj).delta(e),
                                           atol=1e-6, rtol=1e-6)
        block = moe_block(peft_model, layer)
        with torch.no_grad():
            y_hf = block(x_TH[None])[0]
            ours = _merged_reference(block, v4.moe[layer], config, x_TH)
            base_gap = (_merged_reference(block, None, config, x_TH) - y_hf).abs().max()
        torch.testing.assert_close(ours, y_hf, atol=ATOL, rtol=RTOL)
        assert base_gap > 1e-2
