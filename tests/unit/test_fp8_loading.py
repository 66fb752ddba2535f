"""Sliced FP8 loading is exact: re-blocked scale rows, the per-rank pieces of every layout put
back together, and the fused 3-D and per-expert layouts giving the same rank-local weights."""

from __future__ import annotations

import pytest
import torch

from moelora_dist.config.model import ModelConfig
from moelora_dist.files.safetensors_io import SafetensorsReader
from moelora_dist.kernels.block_fp8.naive import dequantize, quantize_weight
from moelora_dist.models.fp8_weights import read_block_fp8, reblock_rows
from moelora_dist.models.moe_weights_fp8 import load_moe_weights_fp8
from moelora_dist.parallel.layout import Layout
from tests.fp8_factory import SIZES, dequantize_blocks, quantize_checkpoint
from tests.hf_factory import make_model, save_model


@pytest.mark.parametrize("pieces", [
    [(0, 128)], [(64, 192)], [(24, 48), (224, 248)], [(0, 200), (300, 301)], [(136, 300)]],
    ids=str)
def test_reblock_rows_is_exact_for_any_row_pieces(pieces):
    gen = torch.Generator().manual_seed(0)
    w = quantize_weight(torch.randn(320, 200, generator=gen))
    full = dequantize(w)
    scales = [(r0, w.scale_inv[r0 // 128:-(-r1 // 128)]) for r0, r1 in pieces]
    scale, block_n = reblock_rows(scales, [r1 - r0 for r0, r1 in pieces])
    local = type(w)(torch.cat([w.weight[r0:r1] for r0, r1 in pieces]), scale, block_n)
    local.check()
    want = torch.cat([full[r0:r1] for r0, r1 in pieces])
    assert torch.equal(dequantize(local), want)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_load")
    out = {}
    for fused in (False, True):
        d = save_model(make_model("qwen3_moe", **SIZES["qwen3_moe"]), root / f"m{fused}")
        quantize_checkpoint(d, fused=fused)
        out[fused] = d
    return out


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_rank_slices_reassemble_the_full_experts(ckpts, tp, ep):
    d = ckpts[False]
    cfg = ModelConfig.from_dir(str(d))
    E, I, H = cfg.num_experts, cfg.moe_intermediate, cfg.hidden_size
    prefix = "model.layers.1.mlp"
    with SafetensorsReader(d) as r:
        full = [[dequantize_blocks(r.get_raw(f"{prefix}.experts.{e}.{n}.weight"),
                                   r.get_raw(f"{prefix}.experts.{e}.{n}.weight_scale_inv"))
                 for n in ("gate_proj", "up_proj", "down_proj")] for e in range(E)]
        layout = Layout(tp, tp, ep)
        for rank in range(tp):
            shard = layout.moe_shard(rank, E, I)
            w = load_moe_weights_fp8(r, cfg, prefix, shard, hidden=H)
            gu, dn = dequantize(w.w_gate_up), dequantize(w.w_down)
            for j, e in enumerate(range(shard.expert_start, shard.expert_end)):
                g, u, down = full[e]
                assert torch.equal(gu[j], torch.cat([g[shard.i_slice], u[shard.i_slice]]))
                assert torch.equal(dn[j], down[:, shard.i_slice])


def test_fused_and_per_expert_layouts_load_alike(ckpts):
    """The fused checkpoint was quantized again from the per-expert one's values, so both
    dequantize to the same weights up to that second rounding; the loader's cut of each must
    reproduce its own checkpoint's values exactly."""
    cfg = ModelConfig.from_dir(str(ckpts[True]))
    shard = Layout(4, 4, 2).moe_shard(3, cfg.num_experts, cfg.moe_intermediate)
    prefix = "model.layers.0.mlp"
    with SafetensorsReader(ckpts[True]) as r:
        w = load_moe_weights_fp8(r, cfg, prefix, shard, hidden=cfg.hidden_size)
        gu = dequantize_blocks(r.get_raw(f"{prefix}.experts.gate_up_proj"),
                               r.get_raw(f"{prefix}.experts.gate_up_proj_scale_inv"))
    g, u = shard.gate_up_slices
    want = torch.cat([gu[shard.expert_slice, g], gu[shard.expert_slice, u]], dim=1)
    assert torch.equal(dequantize(w.w_gate_up), want)
    with SafetensorsReader(ckpts[False]) as r:
        w2 = load_moe_weights_fp8(r, cfg, prefix, shard, hidden=cfg.hidden_size)
    torch.testing.assert_close(dequantize(w2.w_gate_up), want, atol=0.05, rtol=0.07)


def test_columns_off_the_block_grid_are_refused(ckpts):
    cfg = ModelConfig.from_dir(str(ckpts[False]))
    with SafetensorsReader(ckpts[False]) as r, pytest.raises(ValueError, match="block boundaries"):
        read_block_fp8(r, cfg, [("model.layers.0.self_attn.o_proj", None, None)], cols=(64, 128))
