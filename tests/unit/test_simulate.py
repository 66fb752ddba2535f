"""Simulated-rank sweep: every layout sums to the one-process reference; a tp_rank/tp slicer
is caught; the CLI prints the table, writes JSON and sets the exit code."""

import dataclasses
import json

import pytest

from moelora_dist.cli import main as cli
from moelora_dist.lora import slicing
from moelora_dist.testing.simulate import SimConfig, build_case, run_simulation, simulate_layout
from moelora_dist.parallel.layout import Layout

# E=8 lets ep in {1,2,4,8}; I=24 lets moe_tp in {1,2,3,4,6,8}: the rest must be skipped.
SMALL = SimConfig(max_world=8, experts=8, hidden=8, intermediate=24, top_k=2, tokens=12)


@pytest.fixture(scope="module")
def small_case():
    return build_case(SMALL)


def test_every_layout_up_to_world_8_matches_reference():
    case, rows = run_simulation(SMALL, progress=False)
    assert case.lora_effect > 0.05  # the adapters change the output: the check is not vacuous
    by_key = {(r.world, r.tp, r.ep): r for r in rows}
    assert len(rows) == 38  # all (world, tp | world, ep | tp) with world <= 8
    for key in [(4, 4, 2), (8, 8, 2), (8, 8, 4), (6, 6, 2), (8, 4, 2), (2, 2, 2)]:
        assert by_key[key].skipped is None, key
    for r in rows:
        if r.skipped is not None:
            assert (SMALL.experts % r.ep) or (SMALL.intermediate % r.moe_tp), r
            assert "not divisible" in r.skipped
            continue
        assert r.error is None, r
        assert r.passed and r.max_rel_err <= SMALL.tol, r
    assert by_key[(5, 5, 1)].skipped and by_key[(6, 6, 3)].skipped  # moe_tp=5, ep=3


def test_outer_shared_only_pools_match_reference():
    cfg = dataclasses.replace(SMALL, max_world=4, outer_shared_only=True)
    case, rows = run_simulation(cfg, progress=False)
    assert all(a.moe[0].shared_outer for a in case.registry.values())
    assert case.lora_effect > 0.05
    checked = [r for r in rows if r.skipped is None]
    assert len(checked) == 12 and all(r.passed for r in checked), checked


def _tp_rank_slicer(layout: Layout):
    """The classic bug: I rows chosen by tp_rank of tp instead of moe_tp_rank of moe_tp (the
    local size is kept so the pool accepts it; the offset is what goes wrong)."""
    real = slicing.slice_moe_layer

    def wrong(layer, shard):
        moe_ep_rank = shard.expert_start // shard.num_local_experts
        tp_rank = moe_ep_rank * layout.moe_tp + shard.i_start // shard.i_local
        i_start = min(tp_rank * shard.intermediate // layout.tp,
                      shard.intermediate - shard.i_local)
        return real(layer, dataclasses.replace(shard, i_start=i_start))
    return wrong


def test_tp_rank_slicer_fails_tp4_ep2(monkeypatch, small_case):
    bad_layout = Layout(4, 4, 2)
    monkeypatch.setattr(slicing, "slice_moe_layer", _tp_rank_slicer(bad_layout))
    row = simulate_layout(small_case, bad_layout)
    assert row.error is None and row.skipped is None
    assert not row.passed and row.max_rel_err > 1e-3, row
    # with ep=1 the two rules agree, so the same wrong slicer passes there: the failure above
    # is the tp/moe_tp confusion and nothing else
    ok_layout = Layout(4, 4, 1)
    monkeypatch.setattr(slicing, "slice_moe_layer", _tp_rank_slicer(ok_layout))
    assert simulate_layout(small_case, ok_layout).passed


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    rc = cli.main(["sweep", "--simulate", "--max-world", "4", "--experts", "4", "--hidden", "8",
                   "--intermediate", "12", "--tokens", "10", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "world  tp  ep  moe_tp  max abs err  max rel err  pass" in text
    assert "12/12 layouts pass, 1 skipped" in text  # ep=3 does not divide E=4
    assert "skip: num_experts=4 is not divisible by ep=3" in text
    data = json.loads(out.read_text())
    assert data["config"]["experts"] == 4 and len(data["rows"]) == 13
    assert all(r["passed"] or r["skipped"] for r in data["rows"])


def test_cli_exit_code_1_when_a_layout_fails(monkeypatch, capsys):
    real = slicing.slice_moe_layer

    def drops_down(layer, shard):  # loses the down projection's LoRA on every rank
        local = real(layer, shard)
        local.down = None
        return local
    monkeypatch.setattr(slicing, "slice_moe_layer", drops_down)
    rc = cli.main(["sweep", "--simulate", "--max-world", "2", "--experts", "4", "--hidden", "8",
                   "--intermediate", "12", "--tokens", "10"])
    text = capsys.readouterr().out
    assert rc == 1 and "FAIL" in text and "0/4 layouts pass" in text


def test_cli_refuses_bad_config(capsys):
    assert cli.main(["sweep", "--simulate", "--experts", "4", "--top-k", "9"]) == 2
    assert "top_k=9 exceeds experts=4" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["families", "classic"])
def test_both_variants_pass_every_layout(variant):
    cfg = dataclasses.replace(SMALL, max_world=4, variant=variant)
    case, rows = run_simulation(cfg, progress=False)
    assert case.lora_effect > 0.05
    checked = [r for r in rows if r.skipped is None]
    assert len(checked) == 12 and all(r.passed for r in checked), checked
    assert (case.b_down_EH is not None) == (variant == "families")


def test_families_down_bias_counted_once_over_moe_tp(monkeypatch):
    """Every rank adding the down bias (instead of the first I slice only) fails exactly the
    layouts with moe_tp > 1: the simulated sweep sees the bias rule."""
    from moelora_dist.testing import simulate

    real = simulate._variant_args
    monkeypatch.setattr(simulate, "_variant_args",
                        lambda case, *a, with_down_bias=True: real(case, *a))
    case = build_case(dataclasses.replace(SMALL, max_world=4))
    for layout in (Layout(2, 2, 1), Layout(4, 4, 2)):  # moe_tp 2
        row = simulate_layout(case, layout)
        assert not row.passed and row.max_rel_err > 1e-3, row
    assert simulate_layout(case, Layout(2, 2, 2)).passed  # moe_tp 1: one rank per group
