"""Every checkpoint layout load_adapter accepts gives the same canonical deltas.

The formats PEFT does not write (per-expert 2-D, Mixtral w1/w3/w2, stacked 3-D, fused gate_up,
peft <= 0.18 transposed) are written by hand from the factors of a real PEFT
``target_parameters`` adapter, then loaded and compared delta by delta with the original.
Legend: E experts, H hidden, I expert intermediate, r rank.
"""

from __future__ import annotations

import pytest
import torch

from moelora_dist.adapters import load_adapter
from tests.hf_factory import (
    EXPERT_PARAMETERS,
    lora_config_dict,
    make_model,
    make_peft_adapter,
    write_adapter,
)

P = "base_model.model.model.layers"
E, H, I, R = 4, 32, 24, 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A real PEFT adapter (Qwen3-MoE, both expert parameters, r=4, alpha=8) and its model config."""
    d = tmp_path_factory.mktemp("peft")
    model = make_model("qwen3_moe")
    make_peft_adapter(model, d, r=R, alpha=8, target_parameters=EXPERT_PARAMETERS, seed=5)
    return load_adapter(d, model_config=model.config.to_dict()), model.config.to_dict()


def assert_same_deltas(got, want, layers=(0, 1)):
    for layer in layers:
        g, w = got.moe[layer], want.moe[layer]
        assert tuple(g.projections()) == tuple(w.projections())
        for name, f in w.projections().items():
            for e in range(E):
                torch.testing.assert_close(g.projections()[name].delta(e), f.delta(e),
                                           atol=1e-6, rtol=1e-6, msg=f"layer {layer} {name} e{e}")


def _per_expert(ref, block="mlp", names=("gate_proj", "up_proj", "down_proj")):
    t = {}
    for layer, m in ref.moe.items():
        for proj, name in zip(("gate", "up", "down"), names):
            f = getattr(m, proj)
            for e in range(E):
                t[f"{P}.{layer}.{block}.experts.{e}.{name}.lora_A.weight"] = f.a[e].clone()
                t[f"{P}.{layer}.{block}.experts.{e}.{name}.lora_B.weight"] = f.b[e].clone()
    return t


@pytest.mark.parametrize("block,names,fmt", [
    ("mlp", ("gate_proj", "up_proj", "down_proj"), "per-expert"),
    ("block_sparse_moe", ("w1", "w3", "w2"), "mixtral w1/w3/w2 per-expert"),  # w1 gate, w3 up
])
def test_per_expert_2d_keys(reference, tmp_path, block, names, fmt):
    ref, model_config = reference
    write_adapter(tmp_path, _per_expert(ref, block, names), lora_config_dict(r=R, alpha=8))
    got = load_adapter(tmp_path, model_config=model_config)
    assert got.format == fmt
    assert_same_deltas(got, ref)
    assert not got.moe[0].gate_up_shared_a  # separate copies stay separate
    assert not got.moe[0].shared_outer  # per-expert copies differ: no collapse


def test_stacked_3d_per_projection(reference, tmp_path):
    ref, model_config = reference
    t = {}
    for layer, m in ref.moe.items():
        for proj in ("gate", "up", "down"):
            f = getattr(m, proj)
            t[f"{P}.{layer}.mlp.experts.{proj}_proj.lora_A.weight"] = f.a  # [E, r, in]
            t[f"{P}.{layer}.mlp.experts.{proj}_proj.lora_B.weight"] = f.b  # [E, out, r]
    write_adapter(tmp_path, t, lora_config_dict(r=R, alpha=8))
    got = load_adapter(tmp_path)  # no model config: dims and E read from the tensors
    assert got.format == "stacked"
    assert_same_deltas(got, ref)


def test_stacked_fused_gate_up_shares_a(reference, tmp_path):
    ref, model_config = reference
    t = {}
    for layer, m in ref.moe.items():
        t[f"{P}.{layer}.mlp.experts.gate_up_proj.lora_A.weight"] = m.gate.a
        t[f"{P}.{layer}.mlp.experts.gate_up_proj.lora_B.weight"] = torch.cat([m.gate.b, m.up.b], 1)
        t[f"{P}.{layer}.mlp.experts.down_proj.lora_A.weight"] = m.down.a
        t[f"{P}.{layer}.mlp.experts.down_proj.lora_B.weight"] = m.down.b
    write_adapter(tmp_path, t, lora_config_dict(r=R, alpha=8))
    got = load_adapter(tmp_path, model_config=model_config)
    assert got.moe[1].gate_up_shared_a
    assert_same_deltas(got, ref)


def _legacy_tensors(ref):
    """What peft <= 0.18 wrote: lora_A [r*E, out] expert-major, lora_B [in, r*E] rank-major."""
    t = {}
    for layer, m in ref.moe.items():
        b_gu = torch.cat([m.gate.b, m.up.b], 1)  # [E, 2I, r]
        for wrap, a, b in (("base_layer.", m.gate.a, b_gu), ("", m.down.a, m.down.b)):
            t[f"{P}.{layer}.mlp.experts.{wrap}lora_A.weight"] = b.transpose(1, 2).reshape(E * R, -1)
            t[f"{P}.{layer}.mlp.experts.{wrap}lora_B.weight"] = a.permute(2, 1, 0).reshape(-1, R * E)
    return t


@pytest.mark.parametrize("version", ["0.17.1", "0.21.2", None])
@pytest.mark.parametrize("with_model_config", [True, False])
def test_legacy_transposed_orientation_from_shapes(reference, tmp_path, version, with_model_config):
    """Shapes decide (model config, or the two parameters against each other), even against
    a peft_version that says otherwise."""
    ref, model_config = reference
    cfg = lora_config_dict(r=R, alpha=8, target_parameters=EXPERT_PARAMETERS)
    if version:
        cfg["peft_version"] = version
    write_adapter(tmp_path, _legacy_tensors(ref), cfg)
    got = load_adapter(tmp_path, model_config=model_config if with_model_config else None)
    assert got.format == "peft-target-parameters (peft<=0.18 transposed)"
    assert got.moe[0].gate_up_shared_a
    assert_same_deltas(got, ref)


@pytest.mark.parametrize("version,legacy", [("0.18.0", True), ("0.19.0", False), (None, False)])
def test_ambiguous_orientation_uses_peft_version(tmp_path, version, legacy):
    """H == 2I and only gate_up targeted: both orientations fit, peft_version breaks the tie."""
    h, i, e, r = 16, 8, 2, 3
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(r * e, h, generator=gen)  # fits [r*E, H] (new) and [r*E, 2I] (old)
    B = torch.randn(h, r * e, generator=gen)
    cfg = lora_config_dict(r=r, alpha=6, target_parameters=["mlp.experts.gate_up_proj"])
    if version:
        cfg["peft_version"] = version
    write_adapter(tmp_path, {f"{P}.0.mlp.experts.lora_A.weight": A,
                             f"{P}.0.mlp.experts.lora_B.weight": B}, cfg)
    model_config = {"hidden_size": h, "moe_intermediate_size": i, "num_experts": e,
                    "num_hidden_layers": 1}
    if version is None:
        with pytest.warns(UserWarning, match="no peft_version"):
            got = load_adapter(tmp_path, model_config=model_config)
    else:
        got = load_adapter(tmp_path, model_config=model_config)
    if legacy:  # PEFT's own formula for [E, in, out] parameters: einsum("o r e, e r i -> e i o")
        want = torch.einsum("ore,eri->eio", B.view(h, r, e), A.view(e, r, h)) * 2
    else:  # docs/adapters.md: B.view(out, r, E)[:, :, e] @ A.view(E, r, in)[e]
        want = torch.einsum("ore,eri->eoi", B.view(h, r, e), A.view(e, r, h)) * 2
    lora = got.moe[0]
    for ex in range(e):
        fused = torch.cat([lora.gate.delta(ex), lora.up.delta(ex)])
        torch.testing.assert_close(fused, want[ex], atol=1e-5, rtol=1e-5)


def test_per_expert_rank_and_alpha_pattern(tmp_path):
    """Per-expert ranks (rank_pattern on experts.{e}) are zero-padded; scales folded into B."""
    gen = torch.Generator().manual_seed(1)
    ranks, t = {0: 4, 1: 2, 2: 4, 3: 4}, {}
    for e, r in ranks.items():
        for name, din, dout in (("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H)):
            t[f"{P}.0.mlp.experts.{e}.{name}.lora_A.weight"] = torch.randn(r, din, generator=gen)
            t[f"{P}.0.mlp.experts.{e}.{name}.lora_B.weight"] = torch.randn(dout, r, generator=gen)
    cfg = lora_config_dict(r=4, alpha=8, rank_pattern={r"experts\.1\.(gate|up|down)_proj": 2},
                           alpha_pattern={"layers.0.mlp.experts.2.down_proj": 2})
    write_adapter(tmp_path, t, cfg)
    got = load_adapter(tmp_path).moe[0]
    assert got.gate.rank == 4 and got.down.rank == 4
    for e, r in ranks.items():
        for proj, name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            alpha = 2 if (e, proj) == (2, "down") else 8
            a = t[f"{P}.0.mlp.experts.{e}.{name}.lora_A.weight"]
            b = t[f"{P}.0.mlp.experts.{e}.{name}.lora_B.weight"]
            torch.testing.assert_close(getattr(got, proj).delta(e), alpha / r * (b @ a),
                                       atol=1e-5, rtol=1e-5)


def test_partial_expert_set_gives_zero_delta_for_untargeted(reference, tmp_path):
    ref, model_config = reference
    t = {k: v for k, v in _per_expert(ref).items() if ".experts.3." not in k}
    write_adapter(tmp_path, t, lora_config_dict(r=R, alpha=8))
    got = load_adapter(tmp_path, model_config=model_config)
    assert got.moe[0].num_experts == E
    assert torch.count_nonzero(got.moe[0].gate.delta(3)) == 0
    torch.testing.assert_close(got.moe[0].down.delta(2), ref.moe[0].down.delta(2))


@pytest.mark.parametrize("with_model_config", [True, False])
def test_other_wrapper_nesting_is_read_from_shapes(reference, tmp_path, with_model_config):
    """A writer that wrapped down_proj first (down under base_layer) still loads right."""
    ref, model_config = reference
    t = {}
    for layer, m in ref.moe.items():
        b_gu = torch.cat([m.gate.b, m.up.b], 1)  # [E, 2I, r]
        for wrap, a, b in (("", m.gate.a, b_gu), ("base_layer.", m.down.a, m.down.b)):
            # current orientation: lora_A [r*E, in] expert-major, lora_B [out, r*E] rank-major
            t[f"{P}.{layer}.mlp.experts.{wrap}lora_A.weight"] = a.reshape(E * R, -1)
            t[f"{P}.{layer}.mlp.experts.{wrap}lora_B.weight"] = b.permute(1, 2, 0).reshape(-1, R * E)
    write_adapter(tmp_path, t, lora_config_dict(r=R, alpha=8, target_parameters=EXPERT_PARAMETERS,
                                                peft_version="0.21.2"))
    got = load_adapter(tmp_path, model_config=model_config if with_model_config else None)
    assert got.format == "peft-target-parameters"
    assert_same_deltas(got, ref)


def test_name_source_and_dtype_are_kept(reference, tmp_path):
    ref, model_config = reference
    t = {k: v.to(torch.bfloat16) for k, v in _per_expert(ref).items()}
    write_adapter(tmp_path / "my-adapter", t, lora_config_dict(r=R, alpha=8))
    got = load_adapter(tmp_path / "my-adapter", model_config=model_config)
    assert got.name == "my-adapter" and got.source == str(tmp_path / "my-adapter")
    assert got.moe[0].down.b.dtype == torch.bfloat16 and got.config["lora_alpha"] == 8
    assert load_adapter(tmp_path / "my-adapter", name="x").name == "x"


def test_formats_may_differ_per_layer(reference, tmp_path):
    ref, model_config = reference
    t = {k: v for k, v in _legacy_tensors(ref).items() if ".layers.0." in k}
    t.update({k: v for k, v in _per_expert(ref, "block_sparse_moe", ("w1", "w3", "w2")).items()
              if ".layers.1." in k})
    write_adapter(tmp_path, t, lora_config_dict(r=R, alpha=8, target_parameters=EXPERT_PARAMETERS))
    got = load_adapter(tmp_path, model_config=model_config)
    assert got.layer_formats == {0: "peft-target-parameters (peft<=0.18 transposed)",
                                 1: "mixtral w1/w3/w2 per-expert"}
    assert got.moe[0].gate_up_shared_a and not got.moe[1].gate_up_shared_a
    assert_same_deltas(got, ref)
