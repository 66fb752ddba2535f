"""Shared-outer detection per adapter and per layer, forcing it, and dense (non-MoE) targets.

Legend: E experts, H hidden, I expert intermediate, r rank.
"""

from __future__ import annotations

import pytest
import torch

from moelora_dist.adapters import AdapterError, load_adapter
from tests.hf_factory import (
    EXPERT_PARAMETERS,
    lora_config_dict,
    make_model,
    make_peft_adapter,
    write_adapter,
)

P = "base_model.model.model.layers"
E, H, I, r = 4, 32, 24, 4
MODEL_CONFIG = {"hidden_size": H, "moe_intermediate_size": I, "num_experts": E,
                "num_hidden_layers": 2}


def _shared_outer_layer(gen, layer, style):
    """One shared A_gate, A_up, B_down (``style``: "2d" = no expert dim, "3d" = dim 1) plus
    per-expert inner factors. Returns (tensors, expected delta function)."""
    a_gate, a_up = torch.randn(r, H, generator=gen), torch.randn(r, H, generator=gen)
    b_down = torch.randn(H, r, generator=gen)
    t = {}
    pre = f"{P}.{layer}.mlp.experts"
    for name, shared in (("gate_proj.lora_A", a_gate), ("up_proj.lora_A", a_up),
                         ("down_proj.lora_B", b_down)):
        t[f"{pre}.{name}.weight"] = shared if style == "2d" else shared[None]
    inner = {}
    for e in range(E):
        for name, shape in (("gate_proj.lora_B", (I, r)), ("up_proj.lora_B", (I, r)),
                            ("down_proj.lora_A", (r, I))):
            inner[(e, name)] = t[f"{pre}.{e}.{name}.weight"] = torch.randn(*shape, generator=gen)

    def delta(proj, e):
        if proj == "gate":
            return 2.0 * inner[(e, "gate_proj.lora_B")] @ a_gate
        if proj == "up":
            return 2.0 * inner[(e, "up_proj.lora_B")] @ a_up
        return 2.0 * b_down @ inner[(e, "down_proj.lora_A")]

    return t, delta


def _per_expert_layer(gen, layer, identical_outer=False):
    t = {}
    outer = {n: torch.randn(*s, generator=gen) for n, s in
             (("gate_proj.lora_A", (r, H)), ("up_proj.lora_A", (r, H)), ("down_proj.lora_B", (H, r)))}
    for e in range(E):
        for name, shape in (("gate_proj.lora_A", (r, H)), ("up_proj.lora_A", (r, H)),
                            ("down_proj.lora_B", (H, r)), ("gate_proj.lora_B", (I, r)),
                            ("up_proj.lora_B", (I, r)), ("down_proj.lora_A", (r, I))):
            v = outer[name].clone() if identical_outer and name in outer else torch.randn(*shape, generator=gen)
            t[f"{P}.{layer}.mlp.experts.{e}.{name}.weight"] = v
    return t


@pytest.mark.parametrize("style", ["2d", "3d"])
def test_detected_per_layer(tmp_path, style):
    gen = torch.Generator().manual_seed(0)
    t0, delta = _shared_outer_layer(gen, 0, style)  # layer 0: shared-outer
    t1 = _per_expert_layer(gen, 1)  # layer 1: per-expert
    write_adapter(tmp_path, {**t0, **t1}, lora_config_dict(r=r, alpha=8))
    got = load_adapter(tmp_path, model_config=MODEL_CONFIG)
    l0, l1 = got.moe[0], got.moe[1]
    assert l0.shared_outer and not l1.shared_outer
    assert l0.gate.a.shape == (1, r, H) and l0.down.b.shape == (1, H, r)
    assert l0.gate.b.shape == (E, I, r) and l0.down.a.shape == (E, r, I)
    for e in range(E):
        for proj in ("gate", "up", "down"):
            torch.testing.assert_close(getattr(l0, proj).delta(e), delta(proj, e))


def test_force_false_expands_and_keeps_deltas(tmp_path):
    gen = torch.Generator().manual_seed(1)
    t0, delta = _shared_outer_layer(gen, 0, "2d")
    write_adapter(tmp_path, t0, lora_config_dict(r=r, alpha=8))
    got = load_adapter(tmp_path, model_config=MODEL_CONFIG, force_shared_outer=False).moe[0]
    assert not got.shared_outer and got.gate.a.shape == (E, r, H) and got.down.b.shape == (E, H, r)
    for e in range(E):
        torch.testing.assert_close(got.down.delta(e), delta("down", e))


def test_identical_per_expert_copies_collapse(tmp_path):
    """Auto mode: outer factors saved per expert but bitwise identical become one copy."""
    gen = torch.Generator().manual_seed(2)
    t = {**_per_expert_layer(gen, 0, identical_outer=True), **_per_expert_layer(gen, 1)}
    write_adapter(tmp_path, t, lora_config_dict(r=r, alpha=8))
    auto = load_adapter(tmp_path, model_config=MODEL_CONFIG)
    assert auto.moe[0].shared_outer and not auto.moe[1].shared_outer
    assert auto.moe[0].up.a.shape[0] == 1
    want = 2.0 * t[f"{P}.0.mlp.experts.3.up_proj.lora_B.weight"] @ t[f"{P}.0.mlp.experts.3.up_proj.lora_A.weight"]
    torch.testing.assert_close(auto.moe[0].up.delta(3), want)
    with pytest.raises(AdapterError, match=r"layer 1: force_shared_outer=True but the gate lora_A of "
                                           r"expert 1 differs from expert 0's"):
        load_adapter(tmp_path, model_config=MODEL_CONFIG, force_shared_outer=True)


def test_force_true_accepts_shared_and_identical(tmp_path):
    gen = torch.Generator().manual_seed(3)
    t0, _ = _shared_outer_layer(gen, 0, "3d")
    t = {**t0, **_per_expert_layer(gen, 1, identical_outer=True)}
    write_adapter(tmp_path, t, lora_config_dict(r=r, alpha=8))
    got = load_adapter(tmp_path, model_config=MODEL_CONFIG, force_shared_outer=True)
    assert got.moe[0].shared_outer and got.moe[1].shared_outer


def test_peft_shared_a_keeps_identity_through_detection(tmp_path):
    model = make_model("qwen3_moe")
    make_peft_adapter(model, tmp_path, target_parameters=EXPERT_PARAMETERS, seed=4)
    for force in (None, False):
        lora = load_adapter(tmp_path, model_config=model.config.to_dict(),
                            force_shared_outer=force).moe[0]
        assert lora.gate.a is lora.up.a and not lora.shared_outer
    with pytest.raises(AdapterError, match="force_shared_outer=True"):
        load_adapter(tmp_path, force_shared_outer=True)


def test_dense_targets_are_kept_with_normalized_paths(tmp_path):
    """Attention LoRA (real PEFT) and dense-MLP LoRA on Qwen3-MoE's dense layer 1 land in
    ``dense``. PEFT 0.21 rewrites ``target_modules`` gate/up/down_proj into expert
    ``target_parameters`` for the whole model, so the dense-MLP keys are added by hand."""
    from safetensors.torch import load_file

    model = make_model("qwen3_moe", mlp_only_layers=[1])
    make_peft_adapter(model, tmp_path / "peft", r=4, alpha=8, seed=6,
                      target_modules=["q_proj", "v_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    Id = model.config.intermediate_size
    for name, din, dout in (("gate_proj", H, Id), ("up_proj", H, Id), ("down_proj", Id, H)):
        tensors[f"{P}.1.mlp.{name}.lora_A.weight"] = torch.randn(4, din, generator=gen)
        tensors[f"{P}.1.mlp.{name}.lora_B.weight"] = torch.randn(dout, 4, generator=gen)
    import json

    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    write_adapter(tmp_path / "mixed", tensors, cfg)
    got = load_adapter(tmp_path / "mixed", model_config=model.config.to_dict())
    assert sorted(got.moe) == [0]
    assert sorted(got.dense) == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                                 "layers.1.mlp.down_proj", "layers.1.mlp.gate_proj",
                                 "layers.1.mlp.up_proj", "layers.1.self_attn.q_proj",
                                 "layers.1.self_attn.v_proj"]
    f = got.dense["layers.1.mlp.down_proj"]
    assert f.a.shape == (1, 4, Id) and f.b.shape == (1, H, 4) and f.scaling == 2.0
    want = 2.0 * tensors[f"{P}.1.mlp.down_proj.lora_B.weight"] @ tensors[f"{P}.1.mlp.down_proj.lora_A.weight"]
    torch.testing.assert_close(f.delta(0), want)
    # the dense MLP's shape is checked against intermediate_size, not moe_intermediate_size
    tensors[f"{P}.1.mlp.up_proj.lora_B.weight"] = torch.randn(I, 4, generator=gen)
    write_adapter(tmp_path / "bad", tensors, cfg)
    with pytest.raises(AdapterError, match=r"shape mismatch for lora_B of module layers\.1\.mlp\.up_proj"):
        load_adapter(tmp_path / "bad", model_config=model.config.to_dict())
