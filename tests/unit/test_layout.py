"""Rank layout: coordinates, groups, shards and validation on mocked ranks."""

import pytest

from moelora_dist.parallel.layout import Layout, LayoutError, RankLayout, valid_layouts


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_groups_partition_ranks(world):
    for layout in valid_layouts(world):
        for groups, size in ((layout.tp_groups, layout.tp), (layout.ep_groups, layout.ep),
                             (layout.moe_tp_groups, layout.moe_tp)):
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(world)), (layout, groups)
            assert all(len(g) == size for g in groups)


def test_tp8_ep2_table():
    layout = Layout(8, 8, 2)
    assert layout.moe_tp == 4
    assert layout.moe_tp_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.ep_groups == [[0, 4], [1, 5], [2, 6], [3, 7]]
    c = layout.coords(6)
    assert (c.tp_rank, c.moe_ep_rank, c.moe_tp_rank) == (6, 1, 2)


def test_dp_outermost():
    layout = Layout(8, 4, 2)
    assert layout.dp == 2
    assert layout.tp_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    c = layout.coords(5)
    assert (c.dp_rank, c.tp_rank, c.moe_ep_rank, c.moe_tp_rank) == (1, 1, 0, 1)
    assert layout.ep_groups == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_shards_cover_the_layer_once():
    E, I = 16, 96
    for world in (1, 2, 4, 8):
        for layout in valid_layouts(world, E, I):
            covered = {}
            for r in layout.tp_groups[0]:
                s = RankLayout(layout, r).moe_shard(E, I)
                for e in range(s.expert_start, s.expert_end):
                    for i in range(s.i_start, s.i_end):
                        covered[(e, i)] = covered.get((e, i), 0) + 1
            assert len(covered) == E * I and set(covered.values()) == {1}


def test_shard_uses_moe_tp_rank_not_tp_rank():
    # tp=4, ep=2: tp_rank 2 is moe_ep_rank 1, moe_tp_rank 0 -> I rows from 0, not from 2*I/4.
    s = Layout(4, 4, 2).moe_shard(2, num_experts=8, intermediate=64)
    assert (s.expert_start, s.num_local_experts) == (4, 4)
    assert (s.i_start, s.i_local) == (0, 32)


@pytest.mark.parametrize("args, needle", [
    ((8, 3, 1), "tp=3 does not divide world_size=8"),
    ((8, 4, 3), "ep=3 does not divide tp=4"),
    ((0, 1, 1), "world_size must be a positive integer"),
    ((4, -2, 1), "tp must be a positive integer"),
])
def test_invalid_degrees(args, needle):
    with pytest.raises(LayoutError, match=needle):
        Layout(*args)


def test_invalid_model_shape():
    with pytest.raises(LayoutError, match="num_experts=6 is not divisible by ep=4"):
        Layout(4, 4, 4).check_model(6, 64)
    with pytest.raises(LayoutError, match="intermediate=30 is not divisible by moe_tp"):
        Layout(8, 8, 2).check_model(8, 30)


def test_layout_cli_table(capsys):
    from moelora_dist.cli.main import main
    assert main(["layout", "--world", "4", "--tp", "4", "--ep", "2",
                 "--experts", "8", "--intermediate", "64"]) == 0
    out = capsys.readouterr().out
    assert "[4, 8)" in out and "[32, 64)" in out
