"""``moelora-dist sweep`` (multi-process path) end to end at world 1 and 2 on gloo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moelora_dist.cli.sweep_run import parse_world_layouts

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_runs_every_layout_and_judges_by_tolerance(tmp_path):
    # A tolerance of 1e-12 in fp32: layouts with moe_tp > 1 reorder sums (errors ~1e-7) and
    # must be reported as failures; pure EP / DP layouts add exact zeros and must pass.
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, "-m", "moelora_dist.cli", "sweep", "--max-world", "2",
                           "--tol", "1e-12", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    got = {(r["world"], r["tp"], r["ep"], r["dispatcher"]) for r in rows}
    want = {(w, tp, ep, d) for w, tp, ep in [(1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2)]
            for d in ("all_reduce", "all_to_all")}
    assert got == want
    for r in rows:
        assert r["lora_effect"] > 0.1
        assert r["passed"] == (r["moe_tp"] == 1), r
        assert r["max_rel_err"] < 1e-5  # still tiny: only summation order differs
    assert "world  tp  ep  moe_tp  dispatcher" in proc.stdout
    assert "6/8 cases pass" in proc.stdout


def test_layout_list_parsing():
    assert parse_world_layouts("4x4x2,2x2x1,4x2x1") == {4: ["4x2", "2x1"], 2: ["2x1"]}
    assert parse_world_layouts(None) is None
    with pytest.raises(ValueError, match="is not WORLDxTPxEP"):
        parse_world_layouts("4x2")
