"""How a failed job ends under the launcher (one machine, gloo, 2 processes): fast, with the
failing rank's exit code, and its reason once, as the last line.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/integration/test_launcher_failures.py -q
"""

import os
import textwrap

import pytest

from tests.integration.fake_job import USER_MESSAGE
from tests.integration.launching import JOB, ROOT, last_line, run_launcher

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


def _launch_source(tmp_path, name, source, timeout=90):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    return run_launcher(["--nproc-per-node", "2", "--timeout", "60", "-m", name],
                        timeout=timeout, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")


def test_failing_rank_ends_the_job_with_its_name_and_error(tmp_path):
    proc, elapsed = _launch_source(tmp_path, "fail_on_rank1", FAIL_JOB)
    out = proc.stdout
    assert proc.returncode == 1, out  # Python's exit code for an uncaught exception
    assert "the first to fail was rank 1" in out
    assert "rank 1 (local 1" in out and "boom on purpose from rank 1" in out
    # A bug keeps its traceback (from the rank itself); the last line names the rank and error.
    assert "Traceback (most recent call last)" in out
    assert last_line(out).startswith("moelora-launch: rank 1 (local 1, pid ")
    assert last_line(out).endswith("exit code 1: RuntimeError: boom on purpose from rank 1")
    # Rank 0 sleeps 120 s after a collective that can no longer complete: the job must not wait.
    assert elapsed < 60, f"the job took {elapsed:.0f} s to stop"
    assert "[rank0] INFO jobtest: hello from rank 0" in out
    assert "hello from rank 1" not in out  # logs come from rank 0 only


def test_invalid_layout_fails_before_any_group(tmp_path):
    proc, _ = _launch_source(tmp_path, "bad_layout", LAYOUT_JOB)
    out = proc.stdout
    assert proc.returncode == 2, out  # a LayoutError is a user error
    assert "tp=3 does not divide world_size=2" in out
    assert out.count("tp=3 does not divide world_size=2") == 1
    assert "a group was built" not in out


@pytest.mark.parametrize("mode", ["user-error", "report-user-error"])
def test_user_error_is_reported_once_as_the_last_line(mode):
    # Every rank fails with the same user error: raised (the bootstrap reports it) or
    # reported by the job itself the way the moelora-dist commands do (report_user_error).
    proc, _ = run_launcher(["--nproc-per-node", "2", "-m", JOB, mode], timeout=90)
    out = proc.stdout
    assert proc.returncode == 2, out
    assert out.count(USER_MESSAGE) == 1, out
    assert USER_MESSAGE in last_line(out)
    assert last_line(out).startswith("moelora-launch: rank ")
    assert "To enable traceback" not in out and "Traceback" not in out


def test_launcher_exits_with_the_failing_ranks_code():
    proc, elapsed = run_launcher(["--nproc-per-node", "2", "-m", JOB, "exit", "1", "3"],
                                 timeout=90)
    out = proc.stdout
    assert proc.returncode == 3, out
    assert last_line(out).startswith("moelora-launch: rank 1 (local 1, pid "), out
    assert "exit code 3" in last_line(out)
    # Rank 0 (stopped by the launcher, or it lost its peer first) is listed, not blamed.
    assert "the first to fail was rank 1" in out and "  rank 0 (local 0, pid " in out
    assert elapsed < 60

