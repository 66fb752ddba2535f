"""The kernels that have not run on a GPU yet compile for sm_90 on this machine
(``benchmarks/kernels/compile_check.py``, in a process without the interpreter: its code
generation and ptxas, as a launch on an H100 / H200 would compile them). The interpreter tests
check their semantics; this checks that Triton accepts them (a kernel that passed the
interpreter once failed to compile on the GPU, S4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

ROOT = Path(__file__).resolve().parents[2]


def test_unrun_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "benchmarks.kernels.compile_check"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    from benchmarks.kernels.compile_check import CASES

    assert res.stdout.count(": ok") == len(CASES), res.stdout
