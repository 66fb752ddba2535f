"""Each rank reads only its slice of the base expert weights, for every key layout."""

import pytest
import torch
from safetensors.torch import save_file

from moelora_dist.errors import FileError
from moelora_dist.files.safetensors_io import SafetensorsReader
from moelora_dist.models.moe_weights import detect_key_style, load_moe_weights
from moelora_dist.moe.block import MoEBlock
from moelora_dist.parallel.layout import Layout, valid_layouts
from moelora_dist.testing import tiny

CFG = tiny.TinyMoEConfig(hidden=8, intermediate=12, num_experts=4, top_k=2, num_layers=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.save_checkpoint(CFG, tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("layer,style", [(0, "fused"), (1, "per_expert"), (2, "mixtral")])
def test_every_rank_reads_exactly_its_slice(ckpt, layer, style):
    router, gu, down = tiny.full_weights(CFG, layer)
    with SafetensorsReader(ckpt) as index:
        assert detect_key_style(index, CFG.prefix(layer)) == style
        for layout in valid_layouts(4, CFG.num_experts, CFG.intermediate):
            for rank in range(layout.world_size):
                shard = layout.moe_shard(rank, CFG.num_experts, CFG.intermediate)
                w = load_moe_weights(index, CFG.prefix(layer), shard, hidden=CFG.hidden)
                want = MoEBlock.from_full(router, gu, down, top_k=2, renormalize=True, shard=shard)
                assert w.key_style == style
                torch.testing.assert_close(w.router_EH, router, rtol=0, atol=0)
                torch.testing.assert_close(w.w_gate_up, want.w_gate_up.data, rtol=0, atol=0)
                torch.testing.assert_close(w.w_down, want.w_down.data, rtol=0, atol=0)


def test_sharded_checkpoint_directory_and_dtype(tmp_path):
    full = tiny.make_checkpoint(CFG)
    keys = sorted(full)
    save_file({k: full[k] for k in keys[::2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: full[k] for k in keys[1::2]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    shard = Layout(2, 2, 2).moe_shard(1, CFG.num_experts, CFG.intermediate)
    w = load_moe_weights(SafetensorsReader(tmp_path), CFG.prefix(1), shard, hidden=CFG.hidden,
                         dtype=torch.float64)
    _, gu, _ = tiny.full_weights(CFG, 1)
    assert w.w_gate_up.dtype == torch.float64
    torch.testing.assert_close(w.w_gate_up, gu[2:].double())


def test_errors_name_key_and_fix(ckpt, tmp_path):
    shard = Layout(1, 1).moe_shard(0, CFG.num_experts, CFG.intermediate)
    reader = SafetensorsReader(ckpt)
    with pytest.raises(FileError, match="no MoE expert weights under prefix 'model.nope'"):
        load_moe_weights(reader, "model.nope", shard, hidden=CFG.hidden,
                         router_key=f"{CFG.prefix(0)}.gate.weight")
    wrong_i = Layout(1, 1).moe_shard(0, CFG.num_experts, 2 * CFG.intermediate)
    with pytest.raises(FileError, match=r"gate_up_proj' has shape \[4, 24, 8\], expected"):
        load_moe_weights(reader, CFG.prefix(0), wrong_i, hidden=CFG.hidden)
    with pytest.raises(FileError, match=r"gate.weight' has shape \[4, 8\], expected \[4, 9\]"):
        load_moe_weights(reader, CFG.prefix(1), shard, hidden=9)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileError, match="never unpickled"):
        SafetensorsReader(tmp_path)
