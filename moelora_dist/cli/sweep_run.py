"""The multi-process path of ``moelora-dist sweep`` (see :mod:`moelora_dist.cli.sweep`).

The parent writes the tiny checkpoint once, launches one job per world size with torchrun
(:mod:`moelora_dist.cli.sweep_worker` on every rank, in the environment of
:mod:`moelora_dist.parallel.launch_env`), follows the rows rank 0 appends to a JSON-lines
file to drive the progress bar, and prints the table. A world size whose launch fails (a rank
raised, or the timeout hit) fails the sweep, with the end of its output shown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from moelora_dist.cli.sweep_worker import default_tol, lora_effect_floor
from moelora_dist.testing import tiny
from moelora_dist.errors import OptionError
from moelora_dist.moe.dispatch import DISPATCHERS
from moelora_dist.parallel import launch_env
from moelora_dist.parallel.layout import valid_layouts

HEADER = ["world", "tp", "ep", "moe_tp", "dispatcher", "max abs err", "max rel err", "pass"]


def parse_world_layouts(text: str | None) -> dict[int, list[str]] | None:
    """``"4x4x2,2x2x1"`` -> ``{4: ["4x2"], 2: ["2x1"]}`` (world -> TPxEP)."""
    if not text:
        return None
    out: dict[int, list[str]] = {}
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise OptionError(f"--layouts {item!r} is not WORLDxTPxEP (e.g. 4x4x2)")
        out.setdefault(int(parts[0]), []).append(f"{parts[1]}x{parts[2]}")
    return out


def format_rows(rows: list[dict]) -> str:
    body = [[str(r["world"]), str(r["tp"]), str(r["ep"]), str(r["moe_tp"]), r["dispatcher"],
             f"{r['max_abs_err']:.2e}", f"{r['max_rel_err']:.2e}",
             "ok" if r["passed"] else "FAIL"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(HEADER)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths))
                     for line in [HEADER, *body])


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _launch_world(world: int, args, ckpt: Path, out: Path, layouts: list[str] | None,
                  bar: tqdm) -> tuple[int, str]:
    """Run one world size; returns (exit code, output tail)."""
    # torchrun itself (the library never runs the top-level launcher), in the environment
    # the launcher would give its workers: backend, collective timeout, threads, NVLS off.
    env = dict(os.environ)
    launch_env.prepare_worker_env(world, launch_env.backend_for_device(args.device),
                                  min(args.timeout, 300), environ=env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(world), "--max-restarts", "0", "-m", "moelora_dist.cli.sweep_worker",
           "--checkpoint", str(ckpt), "--out", str(out), "--dispatchers", args.dispatchers,
           "--tokens", str(args.tokens), "--seed", str(args.seed), "--dtype", args.dtype]
    if layouts:
        cmd += ["--layouts", ",".join(layouts)]
    if args.adapters:
        cmd += ["--adapters", args.adapters]
    if args.tol is not None:
        cmd += ["--tol", str(args.tol)]
    log_path = out.with_suffix(".log")
    seen, start = 0, time.monotonic()
    with open(log_path, "w") as log_fh:
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            time.sleep(0.3)
            n = len(_read_rows(out))
            bar.update(n - seen)
            seen = n
            if time.monotonic() - start > args.timeout:
                proc.kill()
                proc.wait()
                break
    bar.update(len(_read_rows(out)) - seen)
    tail = "\n".join(log_path.read_text().splitlines()[-25:])
    return (proc.returncode if proc.returncode is not None else 124), tail


def run_processes(args) -> int:
    """Run the sweep from parsed ``moelora-dist sweep`` arguments; 1 if any case fails."""
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    cfg = tiny.TinyMoEConfig(hidden=args.hidden, intermediate=args.intermediate,
                             num_experts=args.experts, top_k=args.top_k,
                             num_layers=args.layers, seed=args.seed)
    if cfg.top_k > cfg.num_experts:
        raise OptionError(f"--top-k {cfg.top_k} exceeds --experts {cfg.num_experts}")
    chosen = parse_world_layouts(args.layouts)
    unknown = [d for d in args.dispatchers.split(",") if d not in DISPATCHERS]
    if unknown:  # before any process starts, not as a failure inside every worker
        raise OptionError(f"--dispatchers {unknown} are unknown; pick from "
                          f"{', '.join(DISPATCHERS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise OptionError("--device cuda but no CUDA device is visible")
        max_gpus = torch.cuda.device_count()
    worlds = [w for w in (1, 2, 4, 8) if w <= args.max_world]
    if chosen is not None:
        worlds = sorted(chosen)
    plan: dict[int, int] = {}
    notes = []
    num_disp = len(args.dispatchers.split(","))
    for w in worlds:
        if args.device == "cuda" and w > max_gpus:
            notes.append(f"world {w} skipped: {max_gpus} GPU(s) visible")
            continue
        fits = [f"{lay.tp}x{lay.ep}" for lay in valid_layouts(w, cfg.num_experts,
                                                              cfg.intermediate)]
        todo = [lay for lay in fits if chosen is None or lay in chosen[w]]
        missing = [] if chosen is None else [lay for lay in chosen[w] if lay not in fits]
        if missing:
            raise OptionError(f"--layouts {missing} of world {w} do not fit E="
                             f"{cfg.num_experts}, I={cfg.intermediate} (valid: {fits})")
        plan[w] = len(todo) * num_disp
    tol = args.tol if args.tol is not None else default_tol(args.dtype, args.device)
    print(f"sweep: tiny MoE E={cfg.num_experts} H={cfg.hidden} I={cfg.intermediate} "
          f"K={cfg.top_k} layers={cfg.num_layers}, T={args.tokens}, {args.dtype} on "
          f"{args.device}, dispatchers {args.dispatchers}, tol {tol:g} (relative)", flush=True)
    rows, failures = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moelora-sweep-") as tmp:
        ckpt = tiny.save_checkpoint(cfg, Path(tmp) / "tiny")
        with tqdm(total=sum(plan.values()), desc="sweep", unit="case") as bar:
            for w in plan:
                out = Path(tmp) / f"world{w}.jsonl"
                bar.set_postfix_str(f"world {w}")
                rc, tail = _launch_world(w, args, ckpt, out,
                                         chosen.get(w) if chosen else None, bar)
                got = _read_rows(out)
                rows += got
                if rc != 0 or len(got) != plan[w]:
                    failures.append(f"world {w}: launch exit code {rc}, {len(got)}/{plan[w]} "
                                    f"cases reported\n{tail}")
    seconds = time.perf_counter() - t0
    if rows:
        print(format_rows(rows))
    for n in notes:
        print(n)
    if rows:
        print(f"the adapters change the stack output by {rows[0]['lora_effect']:.2f} of max |y| "
              f"(a case fails if this is below {lora_effect_floor(tol):g}, ten times the "
              "tolerance: the check would not see a LoRA bug)")
    bad = [r for r in rows if not r["passed"]]
    print(f"{len(rows) - len(bad)}/{sum(plan.values())} cases pass, {seconds:.1f} s")
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": vars(cfg), "device": args.device, "dtype": args.dtype,
                       "tol": tol, "tokens": args.tokens, "seconds": seconds, "rows": rows,
                       "failures": failures, "notes": notes}, fh, indent=2)
        print(f"wrote {args.json}")
    return 1 if bad or failures or not rows else 0
