"""``moelora-dist sweep``: EP/TP correctness sweep against the single-process reference.

    moelora-dist sweep --simulate                       # every layout with world <= 8, CPU
    moelora-dist sweep --simulate --max-world 4 --json sweep.json
    python -m moelora_dist.jobs.sweep --simulate

``--simulate`` plays every rank in one process with mocked rank layouts
(:mod:`moelora_dist.moe.simulate`): per layout, the outputs of the ranks of each TP group
must sum to the merged-weight reference in fp64. Exit code 1 if any layout fails.

The multi-process sweep (real process groups) is not built yet; until it is, ``sweep``
without ``--simulate`` says so and runs the simulated sweep. :func:`run_simulate` is the
simulated path, callable from the multi-process one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

log = logging.getLogger(__name__)


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the simulated sweep (shared with the multi-process one)."""
    from moelora_dist.moe.simulate import SimConfig

    d = SimConfig()
    p.add_argument("--max-world", type=int, default=d.max_world,
                   help=f"largest world size to simulate (default {d.max_world})")
    p.add_argument("--experts", type=int, default=d.experts,
                   help=f"experts E of the simulated MoE layer (default {d.experts})")
    p.add_argument("--hidden", type=int, default=d.hidden, help=f"hidden size H (default {d.hidden})")
    p.add_argument("--intermediate", type=int, default=d.intermediate,
                   help=f"expert intermediate size I (default {d.intermediate}: divisible by "
                        f"every moe_tp up to 8)")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"experts per token (default {d.top_k})")
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"tokens in the batch (default {d.tokens})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--tol", type=float, default=d.tol,
                   help=f"largest passing max-abs error relative to max |y| (default {d.tol:g})")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--simulate", action="store_true",
                   help="one process plays every rank with mocked layouts (no process group)")
    add_simulate_arguments(p)


def format_table(rows) -> str:
    """The rows of :func:`moelora_dist.moe.simulate.run_simulation` as a text table."""
    header = ["world", "tp", "ep", "moe_tp", "max abs err", "max rel err", "pass"]
    body = []
    for r in rows:
        if r.skipped is not None:
            verdict = "skip: " + r.skipped
        elif r.error is not None:
            verdict = "FAIL: " + r.error
        else:
            verdict = "ok" if r.passed else "FAIL"
        errs = ["-", "-"] if r.skipped or r.error else [f"{r.max_abs_err:.2e}",
                                                        f"{r.max_rel_err:.2e}"]
        body.append([str(r.world), str(r.tp), str(r.ep), str(r.moe_tp), *errs, verdict])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header[:-1])]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]
    return "\n".join([fmt(header), *(fmt(b) for b in body)])


def run_simulate(args: argparse.Namespace) -> int:
    """Run the simulated sweep from parsed arguments; print the table; 1 if any row fails."""
    from moelora_dist.moe.simulate import SimConfig, run_simulation

    try:
        cfg = SimConfig(max_world=args.max_world, experts=args.experts, hidden=args.hidden,
                        intermediate=args.intermediate, top_k=args.top_k, tokens=args.tokens,
                        seed=args.seed, tol=args.tol)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    t0 = time.perf_counter()
    case, rows = run_simulation(cfg, progress=True)
    seconds = time.perf_counter() - t0
    print(f"simulated sweep: E={cfg.experts} H={cfg.hidden} I={cfg.intermediate} "
          f"K={cfg.top_k} T={cfg.tokens} seed={cfg.seed}, fp64, {len(case.registry)} adapters "
          f"+ base-only requests; LoRA changes the output by {case.lora_effect:.2f} of max |y|")
    print(format_table(rows))
    checked = [r for r in rows if r.skipped is None]
    failed = [r for r in checked if not r.passed]
    vacuous = case.lora_effect < 1e-3  # a sweep whose LoRA does nothing proves nothing
    print(f"{len(checked) - len(failed)}/{len(checked)} layouts pass, "
          f"{len(rows) - len(checked)} skipped (model shape), {seconds:.1f} s")
    if vacuous:
        print(f"FAIL: the adapters barely change the output ({case.lora_effect:.1e}); the "
              f"check would not see a LoRA bug")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": vars(cfg), "lora_effect": case.lora_effect,
                       "seconds": seconds, "rows": [r.as_dict() for r in rows]}, fh, indent=2)
        print(f"wrote {args.json}")
    return 1 if failed or vacuous else 0


def main(args: argparse.Namespace) -> int:
    if not args.simulate:
        print("note: the multi-process sweep is not built yet; running the simulated sweep "
              "(--simulate)")
    return run_simulate(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(prog="python -m moelora_dist.jobs.sweep",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
