"""The one-way import contract (``[tool.importlinter]`` in pyproject.toml) holds, and it is
not vacuous: planted wrong-way imports in a copy of the tree break it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for name in ("moelora_dist", "launch"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_contract_holds_on_the_tree():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("file,line", [
    ("moelora_dist/kernels/weights.py", "from moelora_dist.lora import pool_types"),
    ("moelora_dist/models/model.py", "import moelora_dist.testing.tiny"),
    ("moelora_dist/parallel/layout.py", "import moelora_dist.adapters.canonical"),
    ("moelora_dist/cli/main.py", "import launch.runner"),
    ("moelora_dist/models/attention.py", "import moelora_dist.engine.scheduler"),
    ("moelora_dist/engine/worker.py", "import moelora_dist.testing.tiny"),
], ids=["kernels->lora", "runtime->testing", "parallel->adapters", "library->launch",
        "models->engine", "engine->testing"])
def test_a_planted_wrong_way_import_breaks_it(tmp_path, file, line):
    tree = _copy(tmp_path)
    target = tree / file
    target.write_text(target.read_text() + f"\n{line}  # planted\n")
    proc = _lint(tree)
    assert proc.returncode != 0 and "BROKEN" in proc.stdout.upper(), proc.stdout + proc.stderr
