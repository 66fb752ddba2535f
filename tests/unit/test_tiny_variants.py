"""The sweep's tiny model carries the family variants: layer 1 routes like DeepSeek-V3 /
GLM-4.5, layer 3 computes like gpt-oss (its interleaved checkpoint read back exactly), so the
multi-process sweep runs them on every layout and dispatcher."""

import torch

from moelora_dist.files.safetensors_io import SafetensorsReader
from moelora_dist.models.moe_weights import load_moe_weights
from moelora_dist.parallel.groups import ParallelGroups
from moelora_dist.parallel.layout import Layout
from moelora_dist.testing import tiny
from moelora_dist.testing.tiny_variants import variant_of

CFG = tiny.TinyMoEConfig(num_layers=4)


def test_layers_carry_the_variants(tmp_path):
    ckpt = tiny.save_checkpoint(CFG, tmp_path)
    groups = ParallelGroups.single("cpu")
    pool = tiny.make_pool(CFG, groups.rank_layout)
    stack = tiny.load_stack(CFG, ckpt, groups, pool)
    kinds = [layer.base.router_spec.kind for layer in stack.layers]
    assert kinds == ["softmax", "sigmoid_grouped", "softmax", "topk_softmax"]
    grouped, oss = stack.layers[1].base, stack.layers[3].base
    assert grouped.router_spec.n_group == 2 and grouped.correction_bias is not None
    assert grouped.router.dtype == torch.float32 and grouped.router_fp32
    assert oss.router_bias is not None and oss.b_gate_up is not None and oss.b_down is not None
    assert oss.activation.name == "swiglu_oai" and oss.activation.limit == 1.0
    # the variants change the outputs (a stack without them differs)
    x, seg = tiny.make_requests(CFG, 20, [None], 0)
    plain_cfg = tiny.TinyMoEConfig(num_layers=4, variants=False)
    plain = tiny.load_stack(plain_cfg, tiny.save_checkpoint(plain_cfg, tmp_path / "p"), groups,
                            tiny.make_pool(plain_cfg, groups.rank_layout))
    with torch.no_grad():
        assert (stack.layers[3](x) - plain.layers[3](x)).abs().max() > 0.1


def test_interleaved_layer_reads_back_sliced(tmp_path):
    """The gpt-oss layer: every rank of every layout reads its experts, its I rows
    (de-interleaved) and its biases; the canonical full weights come from the same draw."""
    ckpt = tiny.save_checkpoint(CFG, tmp_path)
    assert variant_of(CFG, 3) == "oss"
    with SafetensorsReader(ckpt) as r:
        one = load_moe_weights(r, CFG.prefix(3), Layout(1, 1).moe_shard(0, 8, 16),
                               hidden=CFG.hidden, layout="interleaved")
        for layout in (Layout(2, 2, 1), Layout(4, 4, 2)):
            for rank in range(layout.world_size):
                shard = layout.moe_shard(rank, 8, 16)
                w = load_moe_weights(r, CFG.prefix(3), shard, hidden=CFG.hidden,
                                     layout="interleaved")
                es, i0, i1 = shard.expert_slice, shard.i_start, shard.i_end
                rows = torch.cat([torch.arange(i0, i1), torch.arange(16 + i0, 16 + i1)])
                assert torch.equal(w.w_gate_up, one.w_gate_up[es][:, rows])
                assert torch.equal(w.w_down, one.w_down[es][:, :, i0:i1])
                assert torch.equal(w.b_gate_up, one.b_gate_up[es][:, rows])
                assert torch.equal(w.b_down, one.b_down[es])
                assert torch.equal(w.router_bias_E, one.router_bias_E)
