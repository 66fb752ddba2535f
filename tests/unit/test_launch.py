"""The launcher: a failing rank ends the whole job fast and by name; bad layouts fail early."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch.runner import SAFE_ENV, prepare_env, resolve_module

ROOT = Path(__file__).resolve().parents[2]

FAIL_JOB = """
import time, torch, torch.distributed as dist
import logging
from moelora_dist.parallel.groups import init_parallel, destroy_parallel
g = init_parallel(2, 1)
logging.getLogger("jobtest").info("hello from rank %d", g.rank)
try:
    if g.rank == 1:
        raise RuntimeError("boom on purpose from rank 1")
    dist.all_reduce(torch.ones(1), group=g.tp_group)  # rank 0 waits for the dead rank
    time.sleep(120)
finally:
    destroy_parallel()
"""

LAYOUT_JOB = """
import torch.distributed as dist
from moelora_dist.parallel.groups import init_parallel
from moelora_dist.parallel.layout import LayoutError
try:
    init_parallel(3, 1)
except LayoutError:
    assert not dist.is_initialized(), "a group was built before the layout was checked"
    raise
"""


def _launch(tmp_path, name, source, timeout=90):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launch", "--nproc-per-node", "2",
                           "--device", "cpu", "--timeout", "60", "-m", name],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def test_failing_rank_ends_the_job_with_its_name_and_error(tmp_path):
    proc, elapsed = _launch(tmp_path, "fail_on_rank1", FAIL_JOB)
    assert proc.returncode != 0
    assert "the first to fail was rank 1" in proc.stderr
    assert "rank 1 (local 1" in proc.stderr and "boom on purpose from rank 1" in proc.stderr
    # Rank 0 sleeps 120 s after a collective that can no longer complete: the job must not wait.
    assert elapsed < 60, f"the job took {elapsed:.0f} s to stop"
    out = proc.stdout + proc.stderr
    assert "[rank0] INFO jobtest: hello from rank 0" in out
    assert "hello from rank 1" not in out  # logs come from rank 0 only


def test_invalid_layout_fails_before_any_group(tmp_path):
    proc, _ = _launch(tmp_path, "bad_layout", LAYOUT_JOB)
    assert proc.returncode != 0
    assert "tp=3 does not divide world_size=2" in proc.stderr
    assert "a group was built" not in proc.stderr


def test_job_names_and_environment(monkeypatch):
    assert resolve_module("sweep-worker", None) == "moelora_dist.cli.sweep_worker"
    assert resolve_module("tests.x", None) == "tests.x"
    assert resolve_module(None, "pytest") == "pytest"
    with pytest.raises(SystemExit, match="give a job name"):
        resolve_module(None, None)
    for k in (*SAFE_ENV, "OMP_NUM_THREADS", "MOELORA_DIST_BACKEND", "MOELORA_DIST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    assert prepare_env(2, "cpu", 30.0, None) == "cpu"
    assert all(os.environ[k] == v for k, v in SAFE_ENV.items())
    assert os.environ["MOELORA_DIST_BACKEND"] == "gloo"
    assert int(os.environ["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 2)
    with pytest.raises(SystemExit, match="must be >= 1"):
        prepare_env(0, "cpu", 30.0, None)


def test_root_cause_is_not_the_rank_that_lost_its_peer():
    from types import SimpleNamespace as F

    from launch.runner import root_cause_rank

    # Same timestamp (seconds): rank 0 only saw its peer disappear; rank 1 raised the error.
    failures = {0: F(message="RuntimeError: Connection closed by peer [127.0.0.1]:1",
                     timestamp=5, exitcode=1),
                1: F(message="RuntimeError: boom", timestamp=5, exitcode=1)}
    assert root_cause_rank(failures) == 1
    failures[1] = F(message="", timestamp=6, exitcode=-15)  # killed by the launcher
    assert root_cause_rank(failures) == 0  # every failure looks secondary: the earliest
