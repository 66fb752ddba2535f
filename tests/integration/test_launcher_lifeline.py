"""The launcher's workers die with it, even when it is SIGKILLed (it cannot stop them then):
each worker asks the kernel for SIGKILL on its parent's death (launch/bootstrap.py).

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/integration/test_launcher_lifeline.py -q
"""

import os
import signal
import subprocess

from tests.integration.launching import (JOB, ROOT, alive, job_env, kill_pids, launcher,
                                         read_pids, wait_for)

GONE_WITHIN_S = 5  # measured: gone at the second check, 0.1 s (the polling step) after the kill


def test_sigkill_of_the_launcher_kills_every_worker(tmp_path):
    proc = subprocess.Popen(launcher("--nproc-per-node", "2", "-m", JOB, "sleep", str(tmp_path)),
                            cwd=ROOT, env=job_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    pids: list[int] = []
    try:
        wait_for(lambda: len(read_pids(tmp_path)) == 2, 60, "both workers writing their pid")
        pids = read_pids(tmp_path)
        assert all(alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        seconds = wait_for(lambda: not any(alive(p) for p in pids), GONE_WITHIN_S,
                           f"workers {pids} gone after the launcher's SIGKILL")
        print(f"workers gone {seconds:.2f} s after the launcher's SIGKILL")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        kill_pids(pids or read_pids(tmp_path))
