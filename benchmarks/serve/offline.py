"""The offline side of the serving benchmark: the same engine the server builds (the same
options, through ``moelora_dist.cli.serve.build``), driven in this process with no HTTP, closed
loop at the same concurrency. Run by ``bench_serve`` as a subprocess (one model on the GPU at a
time):

    python -m benchmarks.serve.offline --cases cases.json --out result.json -- SERVE OPTIONS

With ``--tp N`` among the serve options it runs under the launcher on N processes: rank 0
drives the cases, the others follow its plans.

``result.json``: per case the statistics of :func:`benchmarks.serve.cases.summarize`, and the
token ids of the check requests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks.serve.cases import STEP_COUNTERS, make_requests, step_columns, summarize
from benchmarks.serve.loadgen import RequestStats


def run_closed_loop(engine, reqs, concurrency: int, output_len: int):
    """Keep ``concurrency`` requests in flight; returns (stats in request order, wall s,
    token ids per request)."""
    from moelora_dist.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    stats: list[RequestStats | None] = [None] * len(reqs)
    ids: list[list[int]] = [[] for _ in reqs]
    todo = iter(range(len(reqs)))

    def submit() -> None:
        i = next(todo, None)
        if i is not None:
            stats[i] = RequestStats(time.perf_counter())
            engine.add_request(f"r{i}", reqs[i][0], params, reqs[i][1])

    t0 = time.perf_counter()
    for _ in range(concurrency):
        submit()
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            i = int(o.request_id[1:])
            if o.new_token_ids:
                stats[i].token_times.append(now)
                stats[i].num_tokens += len(o.new_token_ids)
                ids[i] += o.new_token_ids
            if o.finished:
                submit()
    return stats, time.perf_counter() - t0, ids


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", required=True)
    p.add_argument("--out", required=True)
    ns = p.parse_args(argv[:split])

    from moelora_dist.cli import serve as serve_cli
    from moelora_dist.cli.common import make_groups
    from moelora_dist.parallel.groups import destroy_parallel

    sp = argparse.ArgumentParser()
    serve_cli.add_arguments(sp)
    args = sp.parse_args(argv[split + 1:])
    args.command = "serve"
    cfg, paths = serve_cli.check_options(args)
    groups = make_groups(args)
    try:
        engine = serve_cli.build(args, groups, cfg, paths)
        if not engine.is_leader:  # a TP follower (under the launcher): rank 0 drives the cases
            engine.follow()
            return 0
        return _drive(engine, cfg, ns)
    finally:  # a process group left alive aborts the interpreter's exit now and then (gloo)
        if groups.backend != "none":
            destroy_parallel()


def _drive(engine, cfg, ns) -> int:
    """Rank 0: the warm-up, the check requests and the timed cases; their figures to
    ``ns.out``."""
    spec = json.load(open(ns.cases))
    out = {"cases": [], "check": []}
    for case in spec["warmup"]:
        run_closed_loop(engine, make_requests(case, cfg.vocab_size, spec["num_adapters"]),
                        case["concurrency"], case["output_len"])
    for case in spec["check"]:
        reqs = make_requests(case, cfg.vocab_size, spec["num_adapters"])
        out["check"].append(run_closed_loop(engine, reqs, 1, case["output_len"])[2])
    for case in spec["cases"]:
        reqs = make_requests(case, cfg.vocab_size, spec["num_adapters"])
        before = dict(engine.counters)
        stats, wall, _ = run_closed_loop(engine, reqs, case["concurrency"], case["output_len"])
        out["cases"].append(dict(summarize(stats, wall), **step_columns(
            {k: engine.counters[k] - before[k] for k in STEP_COUNTERS}, wall)))
        print(json.dumps({**case, **out["cases"][-1]}), file=sys.stderr, flush=True)
    engine.shutdown()  # TP followers leave follow()
    with open(ns.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
