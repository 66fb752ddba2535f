"""``moelora-dist sweep``: EP/TP correctness sweep against the single-process reference.

    moelora-dist sweep                                  # real processes, world 1, 2, 4, CPU
    moelora-dist sweep --max-world 8 --json sweep.json
    moelora-dist sweep --device cuda --max-world 2      # NCCL, one GPU per process
    moelora-dist sweep --simulate                       # every layout with world <= 8, CPU
    python -m moelora_dist.cli.sweep --simulate

By default (multi-process, :func:`run_processes`): a built-in tiny MoE model
(:mod:`moelora_dist.testing.tiny`, 4 layers: softmax routing, DeepSeek-V3 / GLM-4.5's grouped
sigmoid routing with its correction bias, gpt-oss's router bias and biased clamped experts in
its interleaved layout) is written to safetensors in a temporary directory;
for each world size 1, 2, 4 (up to ``--max-world``) the launcher starts that many processes
(gloo on CPU, NCCL with ``--device cuda``), and each runs
:mod:`moelora_dist.cli.sweep_worker`: every valid ``(tp, ep)`` layout and every dispatcher,
each rank reading only its slice of the checkpoint, with several adapters (per-expert,
shared-outer, shared-A, down-only; ranks 2 to 8) mixed with base-only requests, through
layer 0 and through the stack, compared with the same model on one process.

``--simulate`` plays every rank in one process with mocked rank layouts
(:mod:`moelora_dist.testing.simulate`): per layout, the outputs of the ranks of each TP group
must sum to the merged-weight reference in fp64. Exit code 1 if any layout fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from moelora_dist.cli.common import job_entry
from moelora_dist.errors import OptionError
from moelora_dist.logs import setup_logging

log = logging.getLogger(__name__)


# Defaults of the options both paths share: (multi-process sweep, --simulate).
SHARED_DEFAULTS = {"max_world": (4, 8), "experts": (8, 24), "hidden": (32, 16),
                   "intermediate": (16, 840), "top_k": (2, 2), "tokens": (48, 24), "seed": (0, 0)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--simulate", action="store_true",
                   help="one process plays every rank with mocked layouts (no process group)")
    d = SHARED_DEFAULTS
    for flag, key, what in (("--max-world", "max_world", "largest world size"),
                            ("--experts", "experts", "experts E of each MoE layer"),
                            ("--hidden", "hidden", "hidden size H"),
                            ("--intermediate", "intermediate", "expert intermediate size I"),
                            ("--top-k", "top_k", "experts per token"),
                            ("--tokens", "tokens", "tokens in the batch"),
                            ("--seed", "seed", "random seed")):
        p.add_argument(flag, type=int, default=None,
                       help=f"{what} (default {d[key][0]}; {d[key][1]} with --simulate)")
    p.add_argument("--tol", type=float, default=None,
                   help="largest passing max-abs error relative to max |y| (default by dtype: "
                        "float32 1e-4 on cpu, 2e-3 on cuda (TF32 products), bfloat16 5e-2, "
                        "float64 1e-9; 1e-10 with --simulate)")
    p.add_argument("--variant", choices=("families", "classic"), default="families",
                   help="--simulate only: families (default: DeepSeek-V3 / GLM-4.5 grouped "
                        "sigmoid routing with a correction bias, gpt-oss's biased clamped "
                        "experts) or classic (softmax routing, SiLU experts)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo processes; cuda: NCCL, one GPU per process; with --simulate "
                        "the device of every simulated rank's compute (default cpu)")
    g = p.add_argument_group("multi-process sweep (ignored with --simulate)")
    g.add_argument("--layers", type=int, default=4,
                   help="MoE layers in the stack (default 4: every key layout, and the grouped "
                        "sigmoid router on layer 1 and gpt-oss's biased clamped experts on "
                        "layer 3)")
    g.add_argument("--layouts", default=None,
                   help="comma list of WORLDxTPxEP to run, e.g. 4x4x2,2x2x1 (default: all)")
    g.add_argument("--dispatchers", default="all_reduce,all_to_all",
                   help="comma list from all_reduce, all_to_all, all_to_all_static, "
                        "all_to_all_fixed, ref_all_reduce, ref_all_to_all, auto (default "
                        "all_reduce,all_to_all)")
    g.add_argument("--adapters", default=None,
                   help="comma list of built-in adapters (default: all of per_expert_r4, "
                        "shared_outer_r8, gate_up_shared_a_r2, down_only_r6)")
    g.add_argument("--dtype", choices=("auto", "float64", "float32", "bfloat16", "float16"),
                   default="auto", help="model and adapter dtype (default auto: float32 on "
                                        "cpu, bfloat16 on cuda)")
    g.add_argument("--timeout", type=float, default=600,
                   help="seconds one world size may take before it counts as failed (default 600)")


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Put the path's own defaults into the shared options left unset."""
    col = 1 if args.simulate else 0
    for key, pair in SHARED_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, pair[col])
    if args.simulate and args.tol is None:
        args.tol = 1e-10
    return args


def format_table(rows) -> str:
    """The rows of :func:`moelora_dist.testing.simulate.run_simulation` as a text table."""
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
    from moelora_dist.cli.sweep_worker import lora_effect_floor
    from moelora_dist.testing.simulate import SimConfig, run_simulation

    try:
        cfg = SimConfig(max_world=args.max_world, experts=args.experts, hidden=args.hidden,
                        intermediate=args.intermediate, top_k=args.top_k, tokens=args.tokens,
                        seed=args.seed, tol=args.tol, device=args.device,
                        variant=args.variant)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    t0 = time.perf_counter()
    case, rows = run_simulation(cfg, progress=True)
    seconds = time.perf_counter() - t0
    print(f"simulated sweep ({cfg.variant}): E={cfg.experts} H={cfg.hidden} "
          f"I={cfg.intermediate} K={cfg.top_k} T={cfg.tokens} seed={cfg.seed}, fp64 on "
          f"{cfg.device}, "
          f"{len(case.registry)} adapters "
          f"+ base-only requests; LoRA changes the output by {case.lora_effect:.2f} of max |y|")
    print(format_table(rows))
    checked = [r for r in rows if r.skipped is None]
    failed = [r for r in checked if not r.passed]
    # a sweep whose LoRA barely moves the output (against its tolerance) proves nothing
    vacuous = case.lora_effect <= lora_effect_floor(cfg.tol)
    print(f"{len(checked) - len(failed)}/{len(checked)} layouts pass, "
          f"{len(rows) - len(checked)} skipped (model shape), {seconds:.1f} s")
    if vacuous:
        print(f"FAIL: the adapters change the output by {case.lora_effect:.1e}, not more than "
              f"ten times the tolerance; the check would not see a LoRA bug")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": vars(cfg), "lora_effect": case.lora_effect,
                       "seconds": seconds, "rows": [r.as_dict() for r in rows]}, fh, indent=2)
        print(f"wrote {args.json}")
    return 1 if failed or vacuous else 0


def main(args: argparse.Namespace) -> int:
    fill_defaults(args)
    if args.simulate:
        return run_simulate(args)
    from moelora_dist.cli.sweep_run import run_processes

    return run_processes(args)


if __name__ == "__main__":
    setup_logging()
    job_entry(__doc__, add_arguments, main)
