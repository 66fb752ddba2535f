"""``moelora-dist sweep --dispatchers``: the fixed-capacity dispatcher runs in the sweep, and
an unknown name fails in one line before any process starts."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _sweep(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "moelora_dist.cli", "sweep", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_sweep_runs_the_fixed_dispatcher(tmp_path):
    out = tmp_path / "sweep.json"
    proc = _sweep("--layouts", "2x2x2,2x2x1", "--dispatchers", "all_to_all_fixed,ref_all_to_all",
                  "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["tp"], r["ep"], r["dispatcher"]) for r in rows} == {
        (2, ep, d) for ep in (1, 2) for d in ("all_to_all_fixed", "ref_all_to_all")}
    assert all(r["passed"] and r["lora_effect"] > 0.1 for r in rows), rows


def test_sweep_refuses_an_unknown_dispatcher_before_launching():
    proc = _sweep("--dispatchers", "all_to_all_fixed,a2a", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "moelora-dist sweep: error: --dispatchers ['a2a'] are unknown; pick from auto, "
        "all_reduce, all_to_all, all_to_all_static, all_to_all_fixed, ref_all_reduce, "
        "ref_all_to_all"]
    assert "sweep:" not in proc.stdout  # nothing started
