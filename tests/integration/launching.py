"""Helpers of the launcher's subprocess tests: run ``python -m launch`` on loopback only, with
bounded time, and leave no process behind.

    proc, seconds = run_launcher(["--nproc-per-node", "2", "-m", JOB, "exit", "1", "3"])
    with Nodes(2, 2, ["-m", JOB, "heartbeat", str(d)], tmp_path) as nodes: ...

gloo binds the loopback interface (``GLOO_SOCKET_IFNAME=lo``), rendezvous endpoints and
``--local-addr`` are 127.0.0.1. Every launcher runs in its own session; on the way out a test
SIGKILLs the launchers it started (their workers die with them: launch/bootstrap.py) and any
worker pid it knows of.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JOB = "tests.integration.fake_job"


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch", "--device", "cpu", *args]


def run_launcher(args: list[str], timeout: float = 120, **env: str
                 ) -> tuple[subprocess.CompletedProcess, float]:
    """Run one launcher to the end; stdout and stderr combined, in the order written.
    On timeout ``subprocess.run`` SIGKILLs the launcher, and its workers die with it."""
    start = time.monotonic()
    proc = subprocess.run(launcher(*args), cwd=ROOT, env=job_env(**env), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                          start_new_session=True)
    return proc, time.monotonic() - start


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def alive(pid: int) -> bool:
    """Running and not a zombie (a dead worker's new parent may never reap it here)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1) -> float:
    """Seconds until ``predicate()``; AssertionError naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic() - start


def read_pids(pid_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(pid_dir.glob("pid*")) if p.read_text().strip()]


def kill_pids(pids) -> None:
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Nodes:
    """``n`` launchers on this machine playing ``n`` nodes of one c10d rendezvous (or static
    mode with ``static=True``); logs in ``log_dir/node<i>.log``. Node 0 starts first and hosts
    the rendezvous store (it listens before node 1 starts)."""

    def __init__(self, n: int, nproc: int, job: list[str], log_dir: Path, *,
                 timeout_s: float = 60, static: bool = False, pid_dir: Path | None = None,
                 **env: str):
        self.n, self.nproc, self.job, self.log_dir = n, nproc, job, Path(log_dir)
        self.timeout_s, self.static, self.pid_dir, self.env = timeout_s, static, pid_dir, env
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []

    def _args(self, i: int) -> list[str]:
        common = ["--nnodes", str(self.n), "--nproc-per-node", str(self.nproc),
                  "--timeout", str(self.timeout_s), "--local-addr", "127.0.0.1"]
        if self.static:
            return [*common, "--node-rank", str(i), *self.job]  # $MASTER_ADDR/$MASTER_PORT
        return [*common, "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", "itest",
                *self.job]

    def __enter__(self) -> "Nodes":
        env = job_env(**self.env)
        if self.static:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.port))
        for i in range(self.n):
            with open(self.log_dir / f"node{i}.log", "w") as log:
                self.procs.append(subprocess.Popen(
                    launcher(*self._args(i)), cwd=ROOT, env=env, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))
            if i == 0:  # node 0 binds the store first, so it is the one hosting it
                wait_for(lambda: _listening(self.port), 60, "node 0 listening")
        return self

    def wait(self, timeout: float) -> list[int]:
        """Exit codes of every launcher; AssertionError (with the logs) after ``timeout``."""
        try:
            wait_for(lambda: all(p.poll() is not None for p in self.procs), timeout,
                     "launchers exiting", poll=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None
        return [p.returncode for p in self.procs]

    def log(self, i: int) -> str:
        return (self.log_dir / f"node{i}.log").read_text()

    def logs(self) -> str:
        return "\n".join(f"--- node {i}\n{self.log(i)[-4000:]}" for i in range(self.n))

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        if self.pid_dir is not None:  # workers die with their launcher; make sure of it
            time.sleep(0.5)
            kill_pids(read_pids(self.pid_dir))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
