"""The launched side of the end-to-end launch tests (tests/integration/test_e2e_launch.py,
test_e2e_families_launch.py, test_fp8_launch.py): a test starts its own module under the
launcher on one ``(tp, ep, dispatcher)`` layout, and that module's ``driver`` hands its
cases to :func:`run_layout`, which does per case what ``moelora-dist logits`` and
``moelora-dist generate`` do (same argument parser, same ``build_engine``, same ``run``).

    launch_driver("tests.integration.test_e2e_launch", root, out, tp=2, ep=2,
                  dispatcher="all_to_all")
    def driver(argv=None): return run_layout(argv, CASES, arrivals=arrivals)

A case ``name`` is a folder ``root/name`` holding ``model``, adapters ``a1`` and ``a2``,
``req.jsonl`` and ``gen.jsonl``; the results go to ``out/name{suffix}.safetensors`` (logits),
``out/name.jsonl`` (tokens) and, with ``arrivals``, ``out/name_arrivals.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]


def launch(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``argv`` from the repository root; fail the test with its output tails if it fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def driver_args(module: str, root: Path, out: Path, tp: int, ep: int,
                dispatcher: str) -> list[str]:
    """The launcher's ``-m MODULE ...`` job: ``module``'s ``driver`` on one layout."""
    return ["-m", module, str(root), "--out", str(out), "--tp", str(tp), "--ep", str(ep),
            "--dispatcher", dispatcher]


def launch_driver(module: str, root: Path, out: Path, tp: int, ep: int,
                  dispatcher: str) -> subprocess.CompletedProcess:
    """``module``'s ``driver`` on ``tp`` gloo CPU processes under ``python -m launch``."""
    return launch([sys.executable, "-m", "launch", "--nproc-per-node", str(tp), "--device", "cpu",
                   "--timeout", "120", *driver_args(module, root, out, tp, ep, dispatcher)])


def run_layout(argv: list[str] | None, names: Iterable[str], *,
               logits_variants: Sequence[tuple[list[str], str]] = (([], ""),),
               arrivals: Callable[[object, Path], None] | None = None) -> int:
    """Run in each launched process: every case of ``names`` on the layout ``argv`` gives
    (``ROOT --out DIR --tp N --ep N [--dispatcher D]``), like the CLI.

    Per case: ``logits`` once per ``(extra flags, file suffix)`` of ``logits_variants``, each on
    an engine of its own; ``generate`` on the engine of the last variant (its adapters already
    registered); then, given ``arrivals``, ``arrivals(engine, out/name_arrivals.json)`` on a
    fresh engine of 9 pages of 4 tokens and 6 tokens a step (small enough to preempt)."""
    from moelora_dist.cli import generate, logits
    from moelora_dist.cli.common import build_engine, check_inputs, make_groups
    from moelora_dist.parallel.groups import destroy_parallel

    p = argparse.ArgumentParser()
    # Positional first: the launcher hands "-m MODULE" arguments over only after a positional.
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--ep", type=int, required=True)
    p.add_argument("--dispatcher", default="auto")
    ns = p.parse_args(argv)
    groups = None
    try:
        for name in names:
            d = ns.root / name
            common = ["--model", str(d / "model"), "--adapter", f"a1={d / 'a1'}", "--adapter",
                      f"a2={d / 'a2'}", "--tp", str(ns.tp), "--ep", str(ns.ep), "--device", "cpu",
                      "--dispatcher", ns.dispatcher]
            for extra, suffix in logits_variants:
                parser = argparse.ArgumentParser()
                logits.add_arguments(parser)
                largs = parser.parse_args(common + extra + [
                    "--requests", str(d / "req.jsonl"),
                    "--out", str(ns.out / f"{name}{suffix}.safetensors")])
                largs.command = "logits"
                cfg, paths, requests, codec = check_inputs(largs, need_max_new_tokens=False)
                groups = groups or make_groups(largs)
                engine = build_engine(largs, groups, cfg, paths, codec)
                logits.run(engine, groups, largs, requests)
            parser = argparse.ArgumentParser()
            generate.add_arguments(parser)
            gargs = parser.parse_args(common + ["--requests", str(d / "gen.jsonl"),
                                                "--out", str(ns.out / f"{name}.jsonl")])
            _, _, requests, _ = check_inputs(gargs, need_max_new_tokens=True)
            generate.run(engine, groups, gargs, requests)
            if arrivals is not None:
                sargs = parser.parse_args(common + ["--requests", str(d / "gen.jsonl"), "--out",
                                                    str(ns.out / "unused"), "--num-pages", "9",
                                                    "--page-size", "4", "--max-batch-tokens", "6"])
                arrivals(build_engine(sargs, groups, cfg, paths, codec),
                         ns.out / f"{name}_arrivals.json")
    finally:
        destroy_parallel()
    return 0
