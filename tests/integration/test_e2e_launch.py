"""End to end under the launcher (gloo CPU processes): logits and greedy tokens on every
``(tp, ep)`` in {(2,1), (2,2), (4,2), (4,4)} equal transformers+PEFT run one request at a time,
and so does the engine serving a stream of arrivals (requests added while others decode,
mixed adapters and base, a prompt longer than a prefill chunk, a page pool small enough to
force preemption) with its followers executing the leader's plans.

One launch per layout runs every architecture (Qwen3-MoE, hybrid Qwen3-MoE with a dense MLP
layer, Mixtral, OLMoE): the launched processes run this file as a module (``driver`` below),
which builds the process groups once and then, per architecture, does exactly what
``moelora-dist logits`` and ``moelora-dist generate`` do (same argument parser, same
``build_engine``, same ``run``), then the stream of arrivals on a second engine. ``test_real_cli_*`` then runs the commands themselves under
``python -m launch`` and ``torchrun`` once, on 4 processes with tp=2 (two data-parallel
replicas that split the requests; rank 0 collects and writes). The tiny models have 2 kv heads, so tp=4 exercises
kv heads replicated over ranks; OLMoE's q/k norm spans all heads (an all-reduce under TP).

Tolerance as in test_e2e_single.py: fp32, ``ATOL = 1e-4`` on logits of size O(1-5); sums over
ranks reorder fp32 additions (~1e-6).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch_driver import launch, launch_driver, run_layout

ATOL = 1e-4
# (tp, ep, dispatcher): "auto" picks all_reduce at these tiny token counts, so two layouts force
# the all-to-all dispatcher to cover it end to end.
LAYOUTS = [(2, 1, "auto"), (2, 2, "all_to_all"), (4, 2, "all_reduce"), (4, 4, "all_to_all")]
CASES = {"qwen3_moe": ("qwen3_moe", False), "qwen3_hybrid": ("qwen3_moe", True),
         "mixtral": ("mixtral", False), "olmoe": ("olmoe", False)}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from tests.e2e_cases import (GEN_REQUESTS, REQUESTS, build_case, hf_generate, hf_logits,
                                 write_requests)

    root = tmp_path_factory.mktemp("e2e_launch")
    out = {}
    for name, (arch, hybrid) in CASES.items():
        case = build_case(arch, root / name, hybrid=hybrid)
        write_requests(root / name / "req.jsonl", REQUESTS)
        write_requests(root / name / "gen.jsonl", GEN_REQUESTS)
        out[name] = (case, hf_logits(case), hf_generate(case),
                     hf_generate(case, [(ids, a, n) for ids, a, n, _ in ARRIVALS]))
    return root, out


# (prompt, adapter, max new tokens, step it arrives at); 9 pages of 4 tokens, 6 tokens a step
ARRIVALS = [(list(range(3, 16)), "a1", 6, 0), ([9, 10], None, 5, 0),
            (list(range(11, 20)), "a2", 4, 1), ([20, 21, 22], "a1", 6, 3), ([30], "a2", 3, 3),
            ([40, 41, 42, 43], None, 5, 6)]


def _check(root: Path, out_dir: Path, cases: dict) -> None:
    for name, (case, ref_logits, ref_tokens, ref_arrivals) in cases.items():
        got = json.loads((out_dir / f"{name}_arrivals.json").read_text())
        # the leader planned steps ahead of the one in flight (async steps; the followers
        # executed the plans it broadcast with the device-copied tokens) and preempted
        assert got["tokens"] == ref_arrivals and got["preemptions"] > 0, name
        assert got["ahead_steps"] > 0, name
        got = load_file(str(out_dir / f"{name}.safetensors"))
        assert len(got) == len(ref_logits)
        for i, ref in enumerate(ref_logits):
            torch.testing.assert_close(got[f"request_{i}"], ref, atol=ATOL, rtol=0,
                                       msg=f"{name} request {i}")
        lines = [json.loads(x) for x in (out_dir / f"{name}.jsonl").read_text().splitlines()]
        assert [x["output_ids"] for x in lines] == ref_tokens, name


@pytest.mark.parametrize("tp,ep,dispatcher", LAYOUTS,
                         ids=[f"tp{t}-ep{e}-{d}" for t, e, d in LAYOUTS])
def test_every_arch_matches_hf_peft_under_launch(cases, tp, ep, dispatcher, tmp_path):
    root, refs = cases
    launch_driver("tests.integration.test_e2e_launch", root, tmp_path, tp, ep, dispatcher)
    _check(root, tmp_path, refs)


def test_real_cli_under_launch_and_torchrun(cases, tmp_path):
    root, refs = cases
    case, ref_logits, ref_tokens, _ = refs["qwen3_hybrid"]
    common = ["--model", str(case.model_dir), *case.adapter_args(), "--device", "cpu"]
    # 4 processes with tp=2: two data-parallel replicas split the requests, rank 0 collects.
    launch([sys.executable, "-m", "launch", "--nproc-per-node", "4", "--device", "cpu",
            "logits", *common, "--requests", str(root / "qwen3_hybrid" / "req.jsonl"),
            "--out", str(tmp_path / "l.safetensors"), "--tp", "2", "--ep", "2"])
    got = load_file(str(tmp_path / "l.safetensors"))
    for i, ref in enumerate(ref_logits):
        torch.testing.assert_close(got[f"request_{i}"], ref, atol=ATOL, rtol=0)
    torchrun = Path(sys.executable).parent / "torchrun"
    launch([str(torchrun), "--standalone", "--nproc-per-node", "4", "-m",
            "moelora_dist.cli.generate", *common,
            "--requests", str(root / "qwen3_hybrid" / "gen.jsonl"),
            "--out", str(tmp_path / "g.jsonl"), "--tp", "2"])
    lines = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [x["output_ids"] for x in lines] == ref_tokens


def test_tp_without_launcher_says_how_to_launch(cases, tmp_path, capsys):
    from moelora_dist.cli.main import main as cli_main

    root, refs = cases
    case = refs["mixtral"][0]
    rc = cli_main(["logits", "--model", str(case.model_dir), "--requests",
                   str(root / "mixtral" / "req.jsonl"), "--out", str(tmp_path / "x"),
                   "--tp", "2", "--device", "cpu"])
    assert rc == 2
    assert "--nproc-per-node 2" in capsys.readouterr().err


def driver(argv: list[str] | None = None) -> int:
    """Run in each launched process: every case of ``root`` on one layout, like the CLI, then
    the stream of :data:`ARRIVALS`."""
    return run_layout(argv, CASES, arrivals=arrivals)


def arrivals(engine, out: Path) -> None:
    """The leader serves :data:`ARRIVALS` step by step; the other ranks follow its plans."""
    from moelora_dist.engine.sampling import SamplingParams
    from tests.engine_cases import drive

    if not engine.is_leader:
        engine.follow()
        return
    done = drive(engine, [r[0] for r in ARRIVALS], [r[1] for r in ARRIVALS],
                 [SamplingParams(max_tokens=r[2], temperature=0.0) for r in ARRIVALS],
                 [r[3] for r in ARRIVALS])
    engine.shutdown()
    if engine.groups.is_rank0:
        out.write_text(json.dumps({"tokens": [done[i][0] for i in range(len(ARRIVALS))],
                                   "preemptions": engine.scheduler.num_preemptions,
                                   "ahead_steps": engine.counters["ahead_steps"]}))


if __name__ == "__main__":
    sys.exit(driver())
