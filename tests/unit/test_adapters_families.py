"""Adapters on DeepSeek-V3, GLM-4.5 and gpt-oss: every LoRA target these families have, the
PEFT traps (one test each), gpt-oss's interleaved expert LoRA, per-expert adapters, tensors
the model cannot place (errors naming them) and ``inspect-adapter --model-config``.

References are transformers + PEFT (or, for hand-written adapters, transformers with the
deltas merged into its weights: the definition of LoRA); fp32 on CPU, ``ATOL = 1e-4`` on
logits of size O(1-5) as in the end-to-end tests.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from moelora_dist.adapters import AdapterError, load_adapter
from moelora_dist.cli.main import main as cli_main
from tests.e2e_families import family_engine
from tests.hf_factory import lora_config_dict
from tests.hf_families import make_family_model, save_family_model

ATOL = 1e-4
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [20, 21, 22, 23, 24]]


def _peft(model, out_dir, seed=1, **lora_kw):
    from peft import LoraConfig, get_peft_model

    p = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(p.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    p.eval().save_pretrained(str(out_dir))
    return p


def _matches(model_dir, adapter_dir, reference, max_rank=16):
    engine = family_engine(model_dir, max_rank=max_rank)
    adapter = engine.add_adapter("a", str(adapter_dir))
    got = engine.prompt_logits(PROMPTS, "a")
    with torch.no_grad():
        for p, o in zip(PROMPTS, got):
            want = reference(input_ids=torch.tensor([p])).logits[0]
            torch.testing.assert_close(o, want, atol=ATOL, rtol=0)
    return adapter


def test_trap_mlp_target_names_become_routed_expert_lora(tmp_path):
    """PEFT rewrites target_modules ending in gate_proj / up_proj / down_proj into the routed
    experts' fused parameters (rank and alpha doubled on gate_up), even when the user meant
    the shared experts: such an adapter carries no shared-expert LoRA. Served exactly as PEFT
    computes it."""
    d = save_family_model(make_family_model("deepseek_v3"), tmp_path / "m")
    names = ["shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]
    ref = _peft(make_family_model("deepseek_v3"), tmp_path / "a", r=4, lora_alpha=8,
                target_modules=names)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and sorted(cfg["target_parameters"]) == [
        "down_proj", "gate_up_proj"]
    assert cfg["rank_pattern"] == {r".*\.gate_up_proj": 8}
    adapter = _matches(d, tmp_path / "a", ref)
    assert adapter.dense == {}  # no shared-expert LoRA: PEFT put it on the routed experts
    assert adapter.moe[1].gate.rank == 8 and adapter.moe[1].down.rank == 4


def test_trap_all_linear_puts_a_lora_on_the_router(tmp_path):
    """``target_modules="all-linear"`` on DeepSeek-V3: LoRA on attention, the routed experts
    and the router (``mlp.gate.weight``: lora_A [r, H], lora_B [E, r]); none on the shared
    experts or the dense MLP of layer 0."""
    d = save_family_model(make_family_model("deepseek_v3"), tmp_path / "m")
    ref = _peft(make_family_model("deepseek_v3"), tmp_path / "a", r=4, lora_alpha=8,
                target_modules="all-linear")
    adapter = _matches(d, tmp_path / "a", ref)
    router = adapter.dense["layers.1.mlp.gate"]
    assert router.a.shape == (1, 4, 32) and router.b.shape == (1, 8, 4)
    assert not any("shared_experts" in p or p.startswith("layers.0.mlp") for p in adapter.dense)
    assert {"layers.0.self_attn.q_a_proj", "layers.2.self_attn.kv_b_proj"} <= set(adapter.dense)


def test_router_rank_pattern_is_keyed_by_the_parameter_name(tmp_path):
    d = save_family_model(make_family_model("glm4_moe"), tmp_path / "m")
    ref = _peft(make_family_model("glm4_moe"), tmp_path / "a", r=4, lora_alpha=8,
                target_modules=["q_proj"], target_parameters=["mlp.gate.weight"],
                rank_pattern={"gate.weight": 2}, alpha_pattern={"gate.weight": 6})
    adapter = _matches(d, tmp_path / "a", ref)
    router = adapter.dense["layers.2.mlp.gate"]
    assert router.rank == 2 and router.scaling == pytest.approx(3.0)


def test_gpt_oss_expert_lora_follows_the_interleaved_rows(tmp_path):
    """gpt-oss stores experts [E, in, out] with gate/up interleaved; PEFT transposes the delta
    onto it, so lora_B's rows alternate gate and up. The canonical gate / up factors are the
    de-interleaved rows: their delta equals PEFT's own delta, column for column."""
    d = save_family_model(make_family_model("gpt_oss"), tmp_path / "m")
    ref = _peft(make_family_model("gpt_oss"), tmp_path / "a", r=3, lora_alpha=6,
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    adapter = _matches(d, tmp_path / "a", ref)
    wrapper = ref.base_model.model.model.layers[1].mlp.experts
    peft_gate_up = wrapper.base_layer.get_delta_weight("default")  # [E, H, 2I] interleaved
    peft_down = wrapper.get_delta_weight("default")  # [E, I, H]
    layer = adapter.moe[1]
    for e in range(4):
        torch.testing.assert_close(layer.gate.delta(e), peft_gate_up[e][:, 0::2].T)
        torch.testing.assert_close(layer.up.delta(e), peft_gate_up[e][:, 1::2].T)
        torch.testing.assert_close(layer.down.delta(e), peft_down[e].T)
    assert (peft_gate_up[0][:, 0::2] - peft_gate_up[0][:, :24]).abs().max() > 0.1


@pytest.mark.parametrize("style", ["per_expert", "shared_outer"])
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_expert_projection_adapter_keys(family, style, tmp_path):
    """Expert-projection keys on the fused in-memory experts: per expert
    (``mlp.experts.{e}.{gate,up,down}_proj``, what transformers-4 era trainers write), or
    shared-outer (one A of gate / up and one B of down for all experts, the inner factors per
    expert). Reference: transformers with the deltas merged (gpt-oss: into its interleaved
    transposed storage)."""
    model = make_family_model(family)
    d = save_family_model(model, tmp_path / "m")
    E = 8 if family == "deepseek_v3" else 4
    layer, r, H, I = 1, 3, 32, 24
    g = torch.Generator().manual_seed(5)
    rn = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    t, experts = {}, model.model.layers[layer].mlp.experts
    pre = f"base_model.model.model.layers.{layer}.mlp.experts"
    shared = {"gate_proj": rn(r, H), "up_proj": rn(r, H), "down_proj": rn(H, r)}
    if style == "shared_outer":  # the outer factor once, 2-D, without an expert index
        t.update({f"{pre}.gate_proj.lora_A.weight": shared["gate_proj"],
                  f"{pre}.up_proj.lora_A.weight": shared["up_proj"],
                  f"{pre}.down_proj.lora_B.weight": shared["down_proj"]})
    with torch.no_grad():
        for e in range(E):
            for proj, (o, i) in (("gate_proj", (I, H)), ("up_proj", (I, H)),
                                 ("down_proj", (H, I))):
                a, b = rn(r, i), rn(o, r)
                if style == "shared_outer":
                    a, b = (a, shared[proj]) if proj == "down_proj" else (shared[proj], b)
                    factor = "A" if proj == "down_proj" else "B"
                    t[f"{pre}.{e}.{proj}.lora_{factor}.weight"] = a if factor == "A" else b
                else:
                    t[f"{pre}.{e}.{proj}.lora_A.weight"] = a
                    t[f"{pre}.{e}.{proj}.lora_B.weight"] = b
                delta = 2.0 * (b @ a)  # alpha 6 / r 3
                if family == "deepseek_v3":
                    if proj == "down_proj":
                        experts.down_proj[e] += delta
                    else:
                        rows = slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)
                        experts.gate_up_proj[e, rows] += delta
                elif proj == "down_proj":
                    experts.down_proj[e] += delta.T
                else:  # gate at even columns, up at odd ones
                    first = 0 if proj == "gate_proj" else 1
                    experts.gate_up_proj[e][:, first::2] += delta.T
    (tmp_path / "a").mkdir()
    save_file(t, str(tmp_path / "a" / "adapter_model.safetensors"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        lora_config_dict(r=r, alpha=6)))
    adapter = _matches(d, tmp_path / "a", model)
    assert "per-expert" in adapter.format
    assert adapter.moe[layer].shared_outer == (style == "shared_outer")


@pytest.mark.parametrize("module,message", [
    ("mlp.shared_experts.gate_proj", "layer 0 of this model has no linear "
                                     "'mlp.shared_experts.gate_proj'"),
    ("mlp.gate", "layer 0 of this model has no linear 'mlp.gate'"),
    ("self_attn.q_proj", "layer 0 of this model has no linear 'self_attn.q_proj'"),
])
def test_tensors_the_model_cannot_place_are_named(module, message, tmp_path):
    """Layer 0 of the DeepSeek-V3 config is dense (no shared experts, no router) and its
    attention has q_a / q_b, no q_proj: such LoRA tensors are refused, never dropped."""
    raw = json.loads((save_family_model(make_family_model("deepseek_v3"), tmp_path / "m")
                      / "config.json").read_text())
    key = f"base_model.model.model.layers.0.{module}"
    t = {f"{key}.lora_A.weight": torch.ones(2, 32), f"{key}.lora_B.weight": torch.ones(8, 2)}
    (tmp_path / "a").mkdir()
    save_file(t, str(tmp_path / "a" / "adapter_model.safetensors"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(lora_config_dict(r=2)))
    with pytest.raises(AdapterError, match=message):
        load_adapter(tmp_path / "a", model_config=raw)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "gpt_oss"])
def test_inspect_adapter_with_model_config(family, tmp_path, capsys):
    from tests.hf_families import make_family_adapter

    d = save_family_model(make_family_model(family), tmp_path / "m")
    make_family_adapter(make_family_model(family), family, "full", tmp_path / "a", r=5,
                        alpha=8, use_rslora=True)
    rc = cli_main(["inspect-adapter", str(tmp_path / "a"), "--model-config",
                   str(d / "config.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    want = {"deepseek_v3": ["self_attn.kv_b_proj", "self_attn.q_a_proj", "mlp.gate ",
                            "mlp.shared_experts.down_proj", "experts.gate"],
            "glm4_moe": ["self_attn.q_proj", "mlp.gate ", "mlp.shared_experts.up_proj"],
            "gpt_oss": ["self_attn.o_proj", "mlp.router", "experts.down"]}[family]
    for name in want:
        assert name in out, (name, out)
    assert "all 2 MoE layers of the model" in out or "all 3 MoE layers of the model" in out
