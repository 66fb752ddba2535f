"""The launcher on one process: job names, the workers' environment, rendezvous options, the
failure report and exit code, user errors under the launcher, the node-split warning.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/unit/test_launch.py -q

The launches themselves (processes, timeouts, kills, two "nodes") are in tests/integration.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as F

import pytest

from launch.runner import (SAFE_ENV, build_parser, exit_code, format_failure, main,
                           prepare_env, rendezvous_args, resolve_module, root_cause_rank)
from moelora_dist.errors import MoeloraError, OptionError, report_user_error
from moelora_dist.parallel import launch_env
from moelora_dist.parallel.groups import node_split_warning
from moelora_dist.parallel.layout import Layout

ROOT = Path(__file__).resolve().parents[2]


def test_job_names_and_environment(monkeypatch):
    assert resolve_module("sweep-worker", None) == "moelora_dist.cli.sweep_worker"
    assert resolve_module("tests.x", None) == "tests.x"
    assert resolve_module(None, "pytest") == "pytest"
    with pytest.raises(OptionError, match="give a job name"):
        resolve_module(None, None)
    for k in (*SAFE_ENV, "OMP_NUM_THREADS", "MOELORA_DIST_BACKEND", "MOELORA_DIST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    net = {"NCCL_SOCKET_IFNAME": "eth7", "GLOO_SOCKET_IFNAME": "eth7", "NCCL_IB_HCA": "mlx5_3",
           "MASTER_ADDR": "10.0.0.9"}
    for k, v in net.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # already set: kept, not overwritten
    assert prepare_env(2, "cpu", 30.0, None) == "cpu"
    assert all(os.environ[k] == v for k, v in SAFE_ENV.items())
    assert os.environ["MOELORA_DIST_BACKEND"] == "gloo"
    assert float(os.environ["MOELORA_DIST_TIMEOUT"]) == 30.0
    assert int(os.environ["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 2)
    assert launch_env.network_env() == dict(sorted(net.items()))  # passed through untouched
    with pytest.raises(OptionError, match="must be >= 1"):
        prepare_env(0, "cpu", 30.0, None)
    with pytest.raises(OptionError, match="must be > 0 seconds"):
        prepare_env(1, "cpu", 0.0, None)


def test_timeout_from_argument_environment_default(monkeypatch):
    monkeypatch.delenv(launch_env.TIMEOUT_ENV, raising=False)
    assert launch_env.timeout_s() == launch_env.DEFAULT_TIMEOUT_S == 120.0
    monkeypatch.setenv(launch_env.TIMEOUT_ENV, "7.5")
    assert launch_env.timeout_s() == 7.5
    assert launch_env.timeout_s(3) == 3.0
    monkeypatch.setenv(launch_env.TIMEOUT_ENV, "soon")
    with pytest.raises(OptionError, match="MOELORA_DIST_TIMEOUT='soon'"):
        launch_env.timeout_s()


def _ns(argv):
    return build_parser().parse_args([*argv, "sweep-worker"])


def test_rendezvous_modes():
    assert rendezvous_args(_ns([]), {}) == ["--standalone"]
    assert rendezvous_args(_ns(["--nnodes", "2", "--rdzv-endpoint", "n0:29400",
                                "--rdzv-id", "j1"]), {}) == [
        "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "n0:29400",
        "--rdzv-id", "j1"]
    # Static mode: the address and port default to $MASTER_ADDR / $MASTER_PORT.
    env = {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"}
    assert rendezvous_args(_ns(["--nnodes", "2", "--node-rank", "1"]), env) == [
        "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port",
        "23456"]
    assert rendezvous_args(_ns(["--nnodes", "2", "--node-rank", "0", "--master-addr", "h",
                                "--local-addr", "10.9.9.9"]), {})[-4:] == [
        "--master-port", "29500", "--local-addr", "10.9.9.9"]
    for argv, match in [
            (["--nnodes", "2"], "needs a meeting point"),
            (["--nnodes", "2", "--master-addr", "h"], "needs --node-rank"),
            (["--nnodes", "2", "--master-addr", "h", "--node-rank", "2"], "outside 0 .. 1"),
            (["--rdzv-endpoint", "h:1", "--node-rank", "0"], "give one"),
            (["--rdzv-backend", "c10d"], "needs --rdzv-endpoint"),
            (["--nnodes", "2", "--rdzv-endpoint", "node0"], "is not HOST:PORT"),
            (["--nnodes", "0"], "--nnodes must be >= 1")]:
        with pytest.raises(OptionError, match=match):
            rendezvous_args(_ns(argv), {})


def test_launcher_option_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert main(["--nnodes", "2", "sweep-worker"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moelora-launch: error: --nnodes 2 needs")


def test_root_cause_is_not_the_rank_that_lost_its_peer():
    # Same timestamp (seconds): rank 0 only saw its peer disappear; rank 1 raised the error.
    failures = {0: F(message="RuntimeError: Connection closed by peer [127.0.0.1]:1",
                     timestamp=5, exitcode=1),
                1: F(message="RuntimeError: boom", timestamp=5, exitcode=1)}
    assert root_cause_rank(failures) == 1
    failures[1] = F(message="", timestamp=6, exitcode=-15)  # killed by the launcher
    assert root_cause_rank(failures) == 0  # every failure looks secondary: the earliest
    # SIGKILL, no error recorded: from outside (the OOM killer), the cause, not a victim.
    failures = {0: _failure(0, 1, "RuntimeError: Connection closed by peer [h]:1"),
                1: _failure(1, -9)}
    assert root_cause_rank(failures) == 1
    assert format_failure(F(failures=failures)).splitlines()[-1].endswith(
        "exit code -9: killed by SIGKILL")


def _failure(rank, exitcode, message=None, timestamp=5, **extra):
    """A torchelastic ProcessFailure as the launcher sees it; ``message`` None: no error file."""
    if message is None:
        return F(local_rank=rank, pid=100 + rank, exitcode=exitcode, timestamp=timestamp,
                 error_file="<N/A>", error_file_data={"message": "<NONE>"}, message="")
    data = {"message": {"message": message, "extraInfo": {"timestamp": str(timestamp),
                                                          **extra}}}
    return F(local_rank=rank, pid=100 + rank, exitcode=exitcode, timestamp=timestamp,
             error_file=f"/tmp/{rank}/error.json", error_file_data=data,
             message=data["message"])


def test_report_ends_with_the_reason_once_and_exit_code_follows_the_root_cause():
    user = "job: error: the file x is missing; write it"
    # Rank 0 recorded its user error, then the launcher stopped it while it was exiting;
    # rank 1 exited 2 by itself at the same second: rank 1 is named, exit code 2.
    failures = {0: _failure(0, -15, user, user_error=True), 1: _failure(1, 2, user,
                                                                        user_error=True)}
    report = format_failure(F(failures=failures))
    assert report.count(user) == 1
    assert report.splitlines()[-1] == f"moelora-launch: rank 1 (local 1, pid 101) exit code 2: {user}"
    assert "rank 0 (local 0, pid 100) exit code 2 (SIGTERM while exiting): the same error" in report
    assert exit_code(failures[root_cause_rank(failures)]) == 2
    assert exit_code(failures[0]) == 2  # recorded a user error, then stopped: still 2
    assert exit_code(_failure(0, -9)) == 128 + 9
    assert exit_code(_failure(0, 3)) == 3
    # A rank that exits 3 without an error record; rank 0 only stopped by the launcher.
    failures = {0: _failure(0, -15, timestamp=6), 1: _failure(1, 3)}
    lines = format_failure(F(failures=failures)).splitlines()
    assert lines[-1].startswith("moelora-launch: rank 1 (local 1, pid 101) exit code 3: exited "
                                "with code 3 without recording an error")
    assert "stopped by the launcher (SIGTERM) after rank 1 failed" in lines[1]
    # The race the bootstrap's exit record closes: rank 1 returned 3, its peer lost it and
    # failed first, and the launcher stopped rank 1 while Python was shutting down.
    failures = {0: _failure(0, 1, "RuntimeError: Connection closed by peer [h]:1"),
                1: _failure(1, -15, "exited with code 3 (the job gave no error message)",
                            exit_code=3)}
    assert root_cause_rank(failures) == 1 and exit_code(failures[1]) == 3
    assert format_failure(F(failures=failures)).splitlines()[-1].startswith(
        "moelora-launch: rank 1 (local 1, pid 101) exit code 3 (SIGTERM while exiting): exited "
        "with code 3")


def test_report_names_the_group_and_the_ranks_that_did_not_join():
    msg = "RuntimeError: Timed out waiting 5000ms (in all_reduce on group ep1_tp4ep2, ranks [1, 3])"
    coll = {"op": "all_reduce", "group": "ep1_tp4ep2", "ranks": [1, 3]}
    failures = {1: _failure(1, 1, msg, collective=coll), 3: _failure(3, -15, timestamp=6)}
    last = format_failure(F(failures=failures)).splitlines()[-1]
    assert last.startswith(f"moelora-launch: rank 1 (local 1, pid 101) exit code 1: {msg}")
    assert last.endswith("ranks of group ep1_tp4ep2 that did not fail in it: 3 (a stalled or "
                         "dead rank is among them)")


def test_report_user_error_under_launcher_torchrun_and_alone(tmp_path, monkeypatch, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from launch.runner import reason

    err_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err_file))
    # A direct child of moelora-launch: the message goes to the error file only.
    monkeypatch.setenv(launch_env.LAUNCHER_PID_ENV, str(os.getppid()))
    assert report_user_error("moelora-dist logits", MoeloraError("bad\nthing")) == 2
    assert capsys.readouterr().err == ""
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(err_file))
    assert reason(failure) == "moelora-dist logits: error: bad thing"
    assert json.loads(err_file.read_text())["message"]["extraInfo"]["user_error"] is True
    # Plain torchrun (or a process the launcher's rank started): printed, and still recorded.
    monkeypatch.setenv(launch_env.LAUNCHER_PID_ENV, "1")
    err_file.unlink()
    assert report_user_error("p", OptionError("x")) == 2
    assert capsys.readouterr().err == "p: error: x\n" and err_file.exists()
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    monkeypatch.delenv(launch_env.LAUNCHER_PID_ENV)
    assert report_user_error("p", OptionError("y")) == 2
    assert capsys.readouterr().err == "p: error: y\n"


def test_node_split_warning():
    assert node_split_warning(Layout(8, 4, 2), 8) is None  # one node
    assert node_split_warning(Layout(8, 4, 2), 4) is None  # 4 divides 4: inside a node
    assert node_split_warning(Layout(8, 2, 1), 4) is None
    assert "tp is larger than the processes per node" in node_split_warning(Layout(8, 8, 2), 4)
    assert "tp does not divide" in node_split_warning(Layout(12, 4, 1), 6)


def test_library_never_imports_the_launcher():
    # moelora_dist.parallel.launch_env and groups are library code: data flows launch -> lib.
    code = ("import sys, moelora_dist.parallel.launch_env, moelora_dist.parallel.groups, "
            "moelora_dist.errors; bad = [m for m in sys.modules if m.split('.')[0] == 'launch'];"
            " assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))

