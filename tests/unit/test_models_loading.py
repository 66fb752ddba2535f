"""Loading Hugging Face checkpoints: config facts per architecture, checkpoint layouts (sharded
with an index, fused 3-D expert keys), each rank's slices (mocked ranks), architecture variants
against transformers, and the errors a user sees for bad input.

Parity tolerance as in test_e2e_single.py: fp32, ``ATOL = 1e-4`` on O(1-5) logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelora_dist.cli.main import main as cli_main
from moelora_dist.errors import FileError
from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.engine.engine import Engine
from moelora_dist.engine.sampling import SamplingParams
from moelora_dist.models.model import MoELoRAModel
from moelora_dist.models.weights import CheckpointWeights
from moelora_dist.parallel.groups import ParallelGroups
from moelora_dist.parallel.layout import Layout, RankLayout
from tests.hf_factory import make_model, save_model

ATOL = 1e-4
IDS = [[3, 4, 5, 6, 7, 8, 9], [10, 11]]


def _hf(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _engine(model_dir):
    return Engine.from_pretrained(str(model_dir), progress=False, num_pages=64)


def _ours(model_dir, **kw):
    engine = Engine.from_pretrained(str(model_dir), progress=False, num_pages=64, **kw)
    return engine.prompt_logits(IDS)


@pytest.mark.parametrize("arch,facts", [
    ("qwen3_moe", dict(qk_norm="head", renormalize=True, moe_intermediate=24,
                       dense_intermediate=40, num_experts=4)),
    ("mixtral", dict(qk_norm="none", renormalize=True, moe_intermediate=24, num_experts=4)),
    ("olmoe", dict(qk_norm="full", renormalize=False, moe_intermediate=24, num_experts=4)),
])
def test_config_facts_from_saved_models(arch, facts, tmp_path):
    cfg = ModelConfig.from_dir(str(save_model(make_model(arch), tmp_path)))
    for k, v in facts.items():
        assert getattr(cfg, k) == v, k
    assert cfg.moe_layers == (0, 1) and cfg.eos_token_ids == (1,)


def test_config_variants():
    base = dict(model_type="qwen3_moe", vocab_size=16, hidden_size=32, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=8, intermediate_size=12,
                rope_theta=5e5, sliding_window=64, use_sliding_window=False)
    cfg = ModelConfig.from_dict(dict(base, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert cfg.moe_layers == (1,) and cfg.dense_layers == (0, 2, 3)
    assert cfg.rope_theta == 5e5 and cfg.sliding_window is None  # legacy key; window off
    assert ModelConfig.from_dict(dict(base, use_sliding_window=True)).sliding_window == 64
    cfg = ModelConfig.from_dict(dict(base, rope_parameters={"rope_type": "default",
                                                            "rope_theta": 1e6}))
    assert cfg.rope_theta == 1e6
    # YaRN is implemented now (moelora_dist/config/rope.py); other scaled RoPEs are refused.
    with pytest.raises(ModelConfigError, match="rope_type 'llama3' is not supported"):
        ModelConfig.from_dict(dict(base, rope_parameters={"rope_type": "llama3", "factor": 4}))
    yarn = ModelConfig.from_dict(dict(base, rope_parameters={
        "rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096}))
    assert yarn.rope.kind == "yarn" and yarn.rope.factor == 4
    with pytest.raises(ModelConfigError, match="model_type 'llama' is not supported"):
        ModelConfig.from_dict(dict(base, model_type="llama"))
    with pytest.raises(ModelConfigError, match="neither num_experts nor num_local_experts"):
        ModelConfig.from_dict({k: v for k, v in base.items() if k != "num_experts"})


def test_sharded_checkpoint_with_index(tmp_path):
    model = make_model("qwen3_moe")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    for o, ids in zip(_ours(tmp_path), IDS):
        torch.testing.assert_close(o, _hf(model, ids), atol=ATOL, rtol=0)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / victim).unlink()
    with pytest.raises(FileError, match="shards that are missing"):
        _ours(tmp_path)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_fused_3d_expert_keys(arch, tmp_path):
    """Rewrite the per-expert checkpoint into the fused ``experts.gate_up_proj [E, 2I, H]`` /
    ``experts.down_proj [E, H, I]`` layout: same logits."""
    model = make_model(arch)
    save_model(model, tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    block, (g, u, d) = ("block_sparse_moe", ("w1", "w3", "w2")) if arch == "mixtral" else (
        "mlp", ("gate_proj", "up_proj", "down_proj"))
    for layer in range(2):
        p = f"model.layers.{layer}.{block}.experts"
        E = 4
        gate = torch.stack([t.pop(f"{p}.{e}.{g}.weight") for e in range(E)])
        up = torch.stack([t.pop(f"{p}.{e}.{u}.weight") for e in range(E)])
        t[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        t[f"{p}.down_proj"] = torch.stack([t.pop(f"{p}.{e}.{d}.weight") for e in range(E)])
    save_file(t, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for o, ids in zip(_ours(tmp_path), IDS):
        torch.testing.assert_close(o, _hf(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch,overrides", [
    ("mixtral", dict(sliding_window=3)),                       # window shorter than prompts
    ("olmoe", dict(clip_qkv=0.3, attention_bias=True)),        # clamp + q/k/v/o biases
    ("qwen3_moe", dict(tie_word_embeddings=True, norm_topk_prob=False, rope_theta=500.0)),
], ids=["mixtral_sliding_window", "olmoe_clip_bias", "qwen3_tied_unnormalized"])
def test_architecture_variants_match_hf(arch, overrides, tmp_path):
    model = make_model(arch, **overrides)
    with torch.no_grad():  # HF initializes biases to zero, which would test nothing
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_model(model, tmp_path)
    for o, ids in zip(_ours(tmp_path), IDS):
        torch.testing.assert_close(o, _hf(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tp,ep,rank", [(4, 2, 3), (2, 2, 1), (4, 1, 2)])
def test_each_rank_holds_only_its_slices(tp, ep, rank, tmp_path):
    """Build one rank's model from a mocked layout (no process group) and compare its weights
    with slices of the full checkpoint."""
    model = make_model("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1])
    save_model(model, tmp_path)
    rl = RankLayout(Layout(tp, tp, ep), rank)
    groups = ParallelGroups(rl.layout, rl, torch.device("cpu"), "none")
    cfg = ModelConfig.from_dir(str(tmp_path))
    model = MoELoRAModel.build(cfg, groups, CheckpointWeights(str(tmp_path), cfg, torch.float32),
                               dtype=torch.float32, progress=False)
    full = load_file(str(tmp_path / "model.safetensors"))
    D, q_heads = 8, 4 // tp
    attn = model.layers[0]["attn"]
    q0 = rank * q_heads * D
    torch.testing.assert_close(attn.w["q_proj"],
                               full["model.layers.0.self_attn.q_proj.weight"][q0:q0 + q_heads * D])
    torch.testing.assert_close(attn.w["o_proj"], full["model.layers.0.self_attn.o_proj.weight"][
        :, q0:q0 + q_heads * D])
    kv = attn.split.kv_start * D
    torch.testing.assert_close(attn.w["k_proj"],
                               full["model.layers.0.self_attn.k_proj.weight"][kv:kv + D * attn.split.num_kv])
    moe = model.layers[2]["moe"].base
    shard = rl.moe_shard(4, 24)
    assert moe.w_gate_up.shape == (shard.num_local_experts, 2 * shard.i_local, 32)
    e, i0 = shard.expert_start, shard.i_start
    torch.testing.assert_close(moe.w_down[0], full[f"model.layers.2.mlp.experts.{e}.down_proj.weight"][
        :, i0:i0 + shard.i_local])
    f0 = rank * 40 // tp
    torch.testing.assert_close(model.layers[1]["mlp"].w["gate_proj"],
                               full["model.layers.1.mlp.gate_proj.weight"][f0:f0 + 40 // tp])


def _run_cli(tmp_path, model_dir, lines, *extra, command="logits"):
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(lines) + "\n")
    return cli_main([command, "--model", str(model_dir), "--requests", str(req),
                     "--out", str(tmp_path / "out"), "--device", "cpu", *extra])


@pytest.mark.parametrize("line,message", [
    ('{"input_ids": [1, 2], "adapter": "nope"}', "unknown adapter 'nope'"),
    ('{"input_ids": [], "adapter": null}', "input_ids is empty"),
    ('{"input_ids": [1, 128], "adapter": null}', r"outside the vocabulary \[0, 128\)"),
    ('{"input_ids": [1, 2], "adapter": 3}', "'adapter' must be a string"),
    ("not json", "request line 1: not valid JSON"),
])
def test_bad_requests_are_refused_with_the_reason(line, message, tmp_path, capsys):
    model_dir = save_model(make_model("mixtral"), tmp_path / "m")
    rc = _run_cli(tmp_path, model_dir, ['{"input_ids": [5], "adapter": null}', line])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_generate_needs_max_new_tokens_and_bad_dirs_fail_clearly(tmp_path, capsys):
    model_dir = save_model(make_model("mixtral"), tmp_path / "m")
    assert _run_cli(tmp_path, model_dir, ['{"input_ids": [5]}'], command="generate") == 2
    assert "needs 'max_new_tokens'" in capsys.readouterr().err
    assert _run_cli(tmp_path, tmp_path / "missing", ['{"input_ids": [5]}']) == 2
    assert "no config.json" in capsys.readouterr().err
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    assert _run_cli(tmp_path, model_dir, ['{"input_ids": [5]}']) == 2
    assert "never unpickled" in capsys.readouterr().err


def test_adapter_on_unserved_module_is_refused(tmp_path):
    from tests.hf_factory import make_peft_adapter

    model_dir = save_model(make_model("mixtral"), tmp_path / "m")
    make_peft_adapter(make_model("mixtral"), tmp_path / "a", r=4,
                      target_modules=["lm_head", "q_proj"])
    engine = Engine.from_pretrained(str(model_dir), max_loras=1, max_rank=4, num_pages=64,
                                         progress=False)
    with pytest.warns(UserWarning):  # the loader skips PEFT's saved lm_head base weight
        with pytest.raises(ValueError, match=r"does not serve: \['lm_head'\]"):
            engine.add_adapter("x", str(tmp_path / "a"), strict=False)
    assert engine.adapter_names == [] and engine.model.pool.loaded() == {}


def test_generate_stops_at_eos_like_hf(tmp_path):
    model = make_model("olmoe")
    model_dir = save_model(model, tmp_path)
    prompt = [5, 6, 7]
    free = _engine(model_dir).generate(
        [prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].output_ids
    gen_cfg = json.loads((model_dir / "generation_config.json").read_text())
    gen_cfg["eos_token_id"] = free[1]  # make the second generated token the EOS
    (model_dir / "generation_config.json").write_text(json.dumps(gen_cfg))
    g = _engine(model_dir).generate([prompt], SamplingParams(max_tokens=4, temperature=0))[0]
    hf = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=4, do_sample=False,
                        eos_token_id=free[1])[0, 3:].tolist()
    assert g.output_ids == free[:2] == hf and g.finish_reason == "eos"


def test_sliding_window_generate_matches_hf(tmp_path):
    model = make_model("mixtral", sliding_window=3)
    model_dir = save_model(model, tmp_path)
    prompt = [5, 6, 7, 8, 9]
    ours = _engine(model_dir).generate(
        [prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].output_ids
    hf = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                        min_new_tokens=6)[0, 5:].tolist()
    assert ours == hf
