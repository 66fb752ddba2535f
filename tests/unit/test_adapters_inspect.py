"""``moelora-dist inspect-adapter``: what it prints, and the bytes of one pool slot."""

from __future__ import annotations

import json

import torch

from moelora_dist.cli.main import main as cli_main
from tests.hf_factory import (
    ATTENTION_MODULES,
    EXPERT_PARAMETERS,
    lora_config_dict,
    make_model,
    make_peft_adapter,
    write_adapter,
)


def _moe_slot_bytes(R, H, I, E, Ea, Eb, num_layers, elem):
    # per MoE layer: 2R*H*Ea + 2I*R*E + R*I*E + H*R*Eb elements, plus per-slot flags
    # (gate_up_a_shared: bool, down_b_shared: bool, slot_rank: int32 -> 6 bytes)
    return num_layers * ((2 * R * H * Ea + 2 * I * R * E + R * I * E + H * R * Eb) * elem + 6)


def test_inspect_peft_adapter(tmp_path, capsys):
    model = make_model("qwen3_moe")
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(model.config.to_dict()))
    make_peft_adapter(model, tmp_path / "lora", r=4, alpha=8, seed=1,
                      target_parameters=EXPERT_PARAMETERS, target_modules=ATTENTION_MODULES,
                      rank_pattern={"layers.1.mlp.experts.down_proj": 2})
    rc = cli_main(["inspect-adapter", str(tmp_path / "lora"), "--model-config", str(cfg_path),
                   "--max-rank", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "format:    peft-target-parameters" in out
    assert "rank_pattern={'layers.1.mlp.experts.down_proj': 2}" in out
    lines = out.splitlines()
    assert any(l.split()[:4] == ["1", "experts.down", "2", "4"] for l in lines)  # rank 2, scale 8/2
    assert any(l.split()[:4] == ["0", "experts.gate", "4", "2"] for l in lines)
    assert any(l.split()[:2] == ["1", "self_attn.k_proj"] for l in lines)
    assert "(gate and up share one A)" in out
    H, I, E = 32, 24, 4
    want = _moe_slot_bytes(8, H, I, E, E, E, 2, 2)
    assert "MoE buffers, per-expert outer factors: " in out and f"({want} bytes)" in out
    q, kv = 4 * 8, 2 * 8  # heads * head_dim, kv_heads * head_dim
    dense = 2 * 8 * ((H + q) + 2 * (H + kv) + (q + H)) * 2  # 2 layers, R*(in+out), bf16
    assert "dense modules (8):" in out and f"({dense} bytes)" in out


def test_inspect_shared_outer_without_model_config_float32(tmp_path, capsys):
    E, H, I, r = 4, 16, 8, 2
    gen = torch.Generator().manual_seed(0)
    pre = "base_model.model.model.layers.0.mlp.experts"
    t = {f"{pre}.gate_proj.lora_A.weight": torch.randn(r, H, generator=gen),
         f"{pre}.up_proj.lora_A.weight": torch.randn(r, H, generator=gen),
         f"{pre}.down_proj.lora_B.weight": torch.randn(H, r, generator=gen)}
    for e in range(E):
        t[f"{pre}.{e}.gate_proj.lora_B.weight"] = torch.randn(I, r, generator=gen)
        t[f"{pre}.{e}.up_proj.lora_B.weight"] = torch.randn(I, r, generator=gen)
        t[f"{pre}.{e}.down_proj.lora_A.weight"] = torch.randn(r, I, generator=gen)
    write_adapter(tmp_path, t, lora_config_dict(r=r, alpha=4))
    assert cli_main(["inspect-adapter", str(tmp_path), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "the adapter's 1 MoE layers (no --model-config" in out
    assert any(l.split()[:6] == ["0", "experts.gate", "2", "2", "1/4", "yes"] for l in out.splitlines())
    assert f"({_moe_slot_bytes(r, H, I, E, E, E, 1, 4)} bytes)" in out
    assert "shared-outer pool:        " in out
    assert f"({_moe_slot_bytes(r, H, I, E, 1, 1, 1, 4)} bytes)" in out


def test_inspect_reports_load_errors(tmp_path, capsys):
    """A load error is one line on stderr and exit code 2 (as every command's user error)."""
    (tmp_path / "adapter_model.pt").write_bytes(b"x")
    assert cli_main(["inspect-adapter", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "moelora-dist inspect-adapter: error: " in err[0]
    assert "only pickled weights" in err[0]
