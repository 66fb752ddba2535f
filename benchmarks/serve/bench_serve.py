"""Serving benchmark: ``moelora-dist serve`` under load over HTTP against the same engine run
offline, with 8 adapters mixed over the requests vs none.

    python -m benchmarks serve --out-dir benchmarks/results/current       # one H200, ~3 min
    python -m benchmarks serve --tiny --device cpu --out-dir /tmp/s        # CPU smoke run
    python -m benchmarks serve --tp 2 --concurrency 64 --out-dir DIR        # two GPUs

Model: random bf16 weights of Qwen3-30B-A3B's shape at full depth (48 layers; ``--layers``),
8 random adapters of rank 16 on q/k/v/o and every expert (``--random-weights qwen3-30b-a3b
--random-adapters 8``). For each concurrency C (``--concurrency``, default 1,16,64) and mode
("base": no adapter; "lora8": request i uses adapter i % 8), ``--requests`` requests (default
max(4, C): one wave; ~3 minutes of device time in all) of ``--prompt-len`` random ids (512) each generate ``--output-len`` tokens (128,
greedy, EOS ignored), closed loop at C (a finished request starts the next); with ``--rate
R`` also an open-loop case at R requests/s (HTTP only). Two sides, one after the other (one
model on the GPU at a time):

- ``offline``: the engine built with the server's own options, driven in-process
  (``benchmarks/serve/offline.py``), no HTTP;
- ``http``: the server as a subprocess on 127.0.0.1, the stdlib load generator
  (``benchmarks/serve/loadgen.py``) streaming every request; once per ``--http-variant
  NAME=ARGS`` (repeatable; ARGS: more server options, shell words, may be empty; default one
  variant ``default=``), each a server of its own, against the one offline side:

      python -m benchmarks serve --http-variant default= \
          --http-variant "si=--switch-interval-ms 0.2" \
          --http-variant "fast=--http-impl httptools --event-loop uvloop"

Both first run untimed warm-up requests that capture every graph the timed cases reach (the
decode graphs up to C, and each timed case once with 4 output tokens). Columns: the
statistics of :func:`~benchmarks.serve.cases.summarize` (``out_tok_s``, TTFT and TPOT p50/p99)
and, on http rows, ``variant`` and ``http_overhead`` = 1 - http / offline output tokens/s
(target <= 0.05 at 64 streams). ``check_ok``: one base and one adapter request alone give the
same greedy tokens over HTTP as offline (each variant's own; on offline rows, every variant's;
no figure of a side whose check fails is trustworthy; the run exits 1). Results:
``serve_<device>.csv`` in ``--out-dir``, and each server's log beside it:
``serve_server_<device>.log``, or ``serve_server_<device>_<variant>.log`` with several variants.

``--tp N --ep M`` (issue 18: two GPUs): both sides on N processes under the launcher (``python
-m launch --nproc-per-node N``): the server as ``launch ... serve --tp N --ep M``, the offline
side likewise; files ``serve_<device>_tp<N>_ep<M>.csv`` and ``serve_server_<device>_tp<N>_ep<M>
.log``.

On the GPU machine (no fastapi/uvicorn there), carry these wheels (Python 3.12): fastapi,
starlette, pydantic, pydantic-core (cp312 manylinux), annotated-types, typing-inspection,
typing-extensions, opentelemetry-api, uvicorn, and for ``--http-impl httptools`` / ``--event-loop
uvloop`` httptools and uvloop (docs/serve.md lists the versions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchmarks.common import device_tag, env_columns, write_csv
from benchmarks.serve.cases import (
    STEP_COUNTERS, completion_body, make_requests, parse_counters, step_columns, summarize,
    warmup_cases)
from benchmarks.serve.loadgen import run_load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = "base"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 48)")
    p.add_argument("--concurrency", default=None, help="comma-separated (default 1,16,64)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per case (default max(4, concurrency))")
    p.add_argument("--rate", type=float, default=None,
                   help="also an open-loop case at this many requests/s (HTTP only)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 512 (tiny 16)")
    p.add_argument("--output-len", type=int, default=None, help="default 128 (tiny 8)")
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--frontend", choices=("process", "thread"), default="process",
                   help="the server's --frontend: HTTP in its own process (default) or on a "
                        "thread of the engine's (the comparison)")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results", "current"))
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: both sides run under the launcher with that "
                        "many processes (the server as `python -m launch ... serve --tp N`)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks inside TP")
    p.add_argument("--http-variant", dest="variants", action="append", type=parse_variant,
                   metavar="NAME=ARGS",
                   help="an HTTP side with these extra server options (shell words, may be "
                        "empty), e.g. 'si=--switch-interval-ms 0.2'; repeatable (default: "
                        "one, 'default=')")
    args = p.parse_args(argv)
    args.variants = args.variants or [("default", [])]
    names = [name for name, _ in args.variants]
    if len(set(names)) < len(names):
        p.error(f"--http-variant: a name is given twice: {names}")
    args.device = args.device or ("cuda" if _has_cuda() else "cpu")
    args.concurrency = [int(c) for c in (args.concurrency or ("1,4" if args.tiny
                                                              else "1,16,64")).split(",")]
    args.prompt_len = args.prompt_len or (16 if args.tiny else 512)
    args.output_len = args.output_len or (8 if args.tiny else 128)
    from moelora_dist.parallel.layout import Layout, LayoutError

    try:
        Layout(args.tp, args.tp, args.ep)
    except LayoutError as exc:
        p.error(str(exc))
    check_variants(p, args)
    return args


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``"NAME=ARGS"`` -> ``(NAME, shlex-split ARGS)``; NAME names the variant's rows and log."""
    name, sep, rest = spec.partition("=")
    if not sep or not re.fullmatch(r"[\w.-]+", name):
        raise argparse.ArgumentTypeError(
            f"{spec!r}: expected NAME=ARGS (NAME of letters, digits, '_', '.', '-'; ARGS: "
            "server options, may be empty), e.g. 'si=--switch-interval-ms 0.2'")
    try:
        return name, shlex.split(rest)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{spec!r}: {exc}") from None


def check_variants(p: argparse.ArgumentParser, args) -> None:
    """Each variant's server options parsed and checked as its server will check them, so a
    mistake in one fails here (``p.error``, exit 2) and not after the offline side has run."""
    from moelora_dist.cli import serve as serve_cli
    from moelora_dist.errors import MoeloraError
    from moelora_dist.serve.server import uvicorn_choices

    for name, extra in args.variants:
        sp = argparse.ArgumentParser(exit_on_error=False)
        serve_cli.add_arguments(sp)
        try:
            # checked as one process would run them: the layout is checked apart (above)
            ns, unknown = sp.parse_known_args(serve_options(args, layout=False) + extra)
            if unknown:
                raise argparse.ArgumentError(None, f"unknown server options {unknown}")
            ns.command = "serve"
            serve_cli.check_options(ns)
            uvicorn_choices(serve_cli.serve_config(ns))
        except (argparse.ArgumentError, MoeloraError) as exc:
            p.error(f"--http-variant {name}: {exc}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def serve_options(args, layout: bool = True) -> list[str]:
    """The server's options; the offline side builds its engine from the same ones (with
    ``layout``, ``--tp``/``--ep`` when above 1)."""
    opts = ["--random-weights", "tiny" if args.tiny else "qwen3-30b-a3b",
            "--random-adapters", str(args.num_adapters), "--random-adapter-rank", str(args.rank),
            "--served-model-name", BASE, "--device", args.device,
            "--dtype", "bfloat16" if args.device == "cuda" else "float32",
            "--max-model-len", str(args.prompt_len + args.output_len + 16),
            "--max-batch", str(max(max(args.concurrency), 8)), "--max-waiting", "100000",
            "--frontend", args.frontend]
    if args.layers:
        opts += ["--num-layers", str(args.layers)]
    if args.device == "cpu":
        opts += ["--num-pages", "2048"]
    if layout and (args.tp > 1 or args.ep > 1):
        opts += ["--tp", str(args.tp), "--ep", str(args.ep)]
    return opts


def launcher(args) -> list[str]:
    """The command prefix of a side on ``args.tp`` processes (``args.tp`` > 1)."""
    return [sys.executable, "-m", "launch", "--device", args.device, "--nproc-per-node",
            str(args.tp)]


def layout_suffix(args) -> str:
    return f"_tp{args.tp}_ep{args.ep}" if args.tp > 1 else ""


def plan(args) -> dict:
    cases = []
    for c in args.concurrency:
        for mode in ("base", "lora8"):
            cases.append(dict(mode=mode, concurrency=c, num_requests=args.requests or
                              max(4, c), prompt_len=args.prompt_len,
                              output_len=args.output_len, seed=c))
    check = [dict(mode=m, concurrency=1, num_requests=1, prompt_len=args.prompt_len,
                  output_len=16, seed=7) for m in ("base", "lora8")]
    return dict(cases=cases, check=check, num_adapters=args.num_adapters,
                warmup=warmup_cases(max(args.concurrency), ("base", "lora8"), cases))


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONUNBUFFERED="1")


def run_offline(args, spec: dict, work: str) -> dict:
    with open(os.path.join(work, "cases.json"), "w") as f:
        json.dump(spec, f)
    out = os.path.join(work, "offline.json")
    own = ["--cases", f.name, "--out", out, "--", *serve_options(args)]
    cmd = ([*launcher(args), "-m", "benchmarks.serve.offline", "--", *own] if args.tp > 1
           else [sys.executable, "-m", "benchmarks.serve.offline", *own])  # launch's own "--"
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, timeout=args.startup_timeout + 900)
    return json.load(open(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _counters(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return parse_counters(r.read().decode())


def run_http(args, spec: dict, variant: tuple[str, list[str]], log_path: str):
    """One HTTP side: the server with the variant's options after the shared ones, its log at
    ``log_path``; returns ([(case, row)] for the timed cases and the ``--rate`` one, check
    stats)."""
    name, extra = variant
    port = _free_port()
    job = launcher(args) if args.tp > 1 else [sys.executable, "-m", "moelora_dist.cli.main"]
    cmd = [*job, "serve", *serve_options(args), *extra, "--port", str(port)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {log.name}")
            time.sleep(0.5)
        vocab = 256 if args.tiny else 151936

        def load(case, **kw):
            bodies = [completion_body(p, a, case["output_len"], BASE)
                      for p, a in make_requests(case, vocab, spec["num_adapters"])]
            return asyncio.run(run_load("127.0.0.1", port, bodies, **kw))

        for case in spec["warmup"]:
            load(case, concurrency=case["concurrency"])
        check = []
        for case in spec["check"]:
            stats, _ = load(case, concurrency=1)
            check.append(stats)
        rows = []
        for case in spec["cases"]:
            before = _counters(port)
            stats, wall = load(case, concurrency=case["concurrency"])
            after = _counters(port)
            rows.append((case, dict(summarize(stats, wall), **step_columns(
                {k: after.get(k, 0) - before.get(k, 0) for k in STEP_COUNTERS}, wall))))
            print(json.dumps({**case, "variant": name, **rows[-1][1]}), file=sys.stderr,
                  flush=True)
        if args.rate:
            case = dict(spec["cases"][-1], mode="lora8", concurrency=0, rate=args.rate)
            stats, wall = load(case, rate=args.rate)
            rows.append((case, dict(summarize(stats, wall), rate=args.rate)))
        return rows, check
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = plan(args)
    work = tempfile.mkdtemp(prefix="bench_serve_")
    offline = run_offline(args, spec, work)
    http = {}  # variant -> ([(case, row)], check_ok)
    try:
        for name, extra in args.variants:
            cases, check = run_http(args, spec, (name, extra),
                                    os.path.join(work, f"server_{name}.log"))
            http[name] = cases, all(s[0].error is None and s[0].token_ids == ids[0]
                                    for ids, s in zip(offline["check"], check))
    finally:  # each server's own log (start-up, graph captures, errors) beside the results
        env = env_columns()  # after the servers: it initializes CUDA in this process
        os.makedirs(args.out_dir, exist_ok=True)
        for name, _ in args.variants:
            log = os.path.join(work, f"server_{name}.log")
            if os.path.exists(log):  # not for the variants after one that failed
                suffix = f"_{name}" if len(args.variants) > 1 else ""
                shutil.copy(log, os.path.join(
                    args.out_dir, f"serve_server_{device_tag(env)}{layout_suffix(args)}"
                    f"{suffix}.log"))
    all_ok = all(ok for _, ok in http.values())
    rows = []
    first, _ = next(iter(http.values()))  # every variant ran the same cases
    for i, (case, _) in enumerate(first):
        base = {k: v for k, v in case.items() if k != "seed"}
        off = offline["cases"][i] if i < len(offline["cases"]) else None
        if off is not None:
            rows.append(dict(base, side="offline", variant="", **off, check_ok=all_ok))
        for name, (cases, ok) in http.items():
            row = cases[i][1]
            over = round(1 - row["out_tok_s"] / off["out_tok_s"], 4) if off and \
                off["out_tok_s"] else ""
            rows.append(dict(base, side="http", variant=name, **row, http_overhead=over,
                             check_ok=ok))
    path = os.path.join(args.out_dir, f"serve_{device_tag(env)}{layout_suffix(args)}.csv")
    write_csv(path, rows, env)
    sides = [r["side"] if r["side"] == "offline" else f"http[{r['variant']}]" for r in rows]
    width = max(map(len, sides))
    for side, r in zip(sides, rows):
        print(f"{side:>{width}} {r['mode']:>5} C={r['concurrency']:<3} {r['out_tok_s']:>10} tok/s "
              f"TTFT p50/p99 {r['ttft_p50_ms']}/{r['ttft_p99_ms']} ms  TPOT p50/p99 "
              f"{r['tpot_p50_ms']}/{r['tpot_p99_ms']} ms  steps {r.get('steps')} "
              f"(decode only {r.get('decode_steps')}, {r.get('ms_per_step')} ms apart, "
              f"{r.get('step_ms')} ms in step)  "
              f"overhead {r.get('http_overhead', '')}"
              f"  errors {r['errors']}  check {'ok' if r['check_ok'] else 'FAILED'}")
    print(f"wrote {path}")
    return 0 if all_ok and not any(r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
