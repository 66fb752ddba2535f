"""The serving benchmark's CPU smoke run (``python -m benchmarks serve --tiny``): both sides
run (the offline engine and the HTTP server under the stdlib load generator), every request
streams all its tokens, the check requests agree token for token, and the CSV has one
offline and one http row per case with the HTTP overhead column. Figures on a shared CPU mean
nothing; the GPU run is the measurement (docs/serve.md). About 40 s."""

import csv
import subprocess
import sys

from tests.integration.launching import ROOT, job_env


def _smoke_run(tmp_path, csv_name, *extra, timeout=300):
    """The tiny benchmark at 2 streams, 3 requests of 5 tokens: its CSV rows, each checked
    (both sides per mode, no error, every token streamed, HTTP tokens equal offline)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "serve", "--tiny", "--device",
                           "cpu", *extra, "--concurrency", "2", "--requests", "3",
                           "--output-len", "5", "--out-dir", str(tmp_path)], cwd=ROOT,
                          env=job_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / csv_name)))
    assert [(r["side"], r["mode"]) for r in rows] == [
        ("offline", "base"), ("http", "base"), ("offline", "lora8"), ("http", "lora8")]
    for r in rows:
        assert r["errors"] == "0" and r["output_tokens"] == str(3 * 5) and r["check_ok"] == "True"
    return rows


def test_serve_benchmark_smoke_run(tmp_path):
    rows = _smoke_run(tmp_path, "serve_cpu.csv")
    for r in rows:
        assert float(r["out_tok_s"]) > 0 and float(r["ttft_p50_ms"]) > 0
    assert all(r["http_overhead"] != "" and r["variant"] == "default"
               for r in rows if r["side"] == "http")
    assert (tmp_path / "serve_server_cpu.log").stat().st_size > 0  # one variant: the plain name


def test_serve_benchmark_on_tp2_ep2_under_the_launcher(tmp_path):
    """``--tp 2 --ep 2``: both sides on two processes under the launcher (the server as
    ``launch ... serve --tp 2 --ep 2``, rank 1 following): every request streams all its
    tokens and HTTP gives the offline side's greedy tokens. About 60 s."""
    _smoke_run(tmp_path, "serve_cpu_tp2_ep2.csv", "--tp", "2", "--ep", "2", timeout=400)
    log = (tmp_path / "serve_server_cpu_tp2_ep2.log").read_text()
    assert "parallel groups ready: world=2 dp=1 tp=2 ep=2" in log  # the server's layout
