"""The engine benchmark on a TP layout (``--tp 2 --ep 2``) under the launcher on gloo: rank 0
schedules and writes the CSV, rank 1 follows its plans; the check (Triton path vs reference,
collective) passes; every case's tokens arrive (the counts match the requested lengths, which a
follower that missed a plan would hang or break). Figures on a shared CPU mean nothing; the
GPU run is the measurement. About 30 s."""

import csv

from tests.integration.launching import run_launcher


def test_engine_benchmark_on_tp2_ep2_under_the_launcher(tmp_path):
    proc, _ = run_launcher(["--nproc-per-node", "2", "-m", "benchmarks.engine.bench_engine",
                            "--", "--tiny", "--device", "cpu", "--tp", "2", "--ep", "2",
                            "--concurrency", "1,3", "--output-len", "5",
                            "--out-dir", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "engine_cpu_tiny_tp2_ep2.csv")))
    assert [(r["concurrency"], r["mode"]) for r in rows] == [
        ("1", "base"), ("1", "lora8"), ("3", "base"), ("3", "lora8")]
    for r in rows:
        assert (r["tp"], r["ep"], r["ok"], r["preemptions"]) == ("2", "2", "True", "0")
        assert float(r["out_tok_s"]) > 0 and float(r["decode_tok_s"]) > 0
        assert not r.get("graph_step_ms")  # one rank cannot replay a TP step alone
    assert float(rows[1]["decode_tok_s_ratio"]) > 0


def test_engine_benchmark_refuses_a_tp_without_its_processes(tmp_path):
    import subprocess
    import sys

    from tests.integration.launching import ROOT, job_env

    proc = subprocess.run([sys.executable, "-m", "benchmarks", "engine", "--tiny", "--device",
                           "cpu", "--tp", "2", "--out-dir", str(tmp_path)], cwd=ROOT,
                          env=job_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--tp 2 with WORLD_SIZE=1" in proc.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())
