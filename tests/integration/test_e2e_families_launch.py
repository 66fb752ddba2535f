"""DeepSeek-V3, GLM-4.5 and gpt-oss under the launcher (gloo CPU processes): logits and
greedy tokens on (tp, ep) in {(2,1), (2,2), (4,2)} equal transformers+PEFT run one request at
a time, with two adapters (attention + shared experts + dense MLP + router + experts, rank 5
rsLoRA; experts only) mixed with base-only requests; and so does the engine serving a stream
of arrivals through a page pool small enough to preempt (``ARRIVALS`` of
tests/integration/test_e2e_launch.py), its followers executing the leader's plans.

One launch per layout runs every family (the launched processes run this file as a module,
``driver`` below, doing what ``moelora-dist logits`` and ``generate`` do: same parser, same
``build_engine``, same ``run``). What the layouts exercise: MLA heads split with the latent
projections replicated (tp 4: one head per rank), kv heads replicated (GLM, gpt-oss at tp 4),
sinks split with their heads, gpt-oss's down bias added once over moe_tp = 2, the shared
experts and dense MLP split over TP, the all-to-all dispatcher with ep = 2.

Tolerance as in tests/unit/test_e2e_families.py: fp32, ``ATOL = 1e-4``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.test_e2e_launch import ARRIVALS, _launch, arrivals

ATOL = 1e-4
LAYOUTS = [(2, 1, "auto"), (2, 2, "all_to_all"), (4, 2, "all_reduce")]
FAMILIES = ("deepseek_v3", "glm4_moe", "gpt_oss")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from tests.e2e_cases import hf_generate, hf_logits, write_requests
    from tests.e2e_families import FAMILY_GEN, FAMILY_REQUESTS, build_family_case

    root = tmp_path_factory.mktemp("e2e_families_launch")
    out = {}
    for name in FAMILIES:
        case = build_family_case(name, root / name)
        write_requests(root / name / "req.jsonl", FAMILY_REQUESTS)
        write_requests(root / name / "gen.jsonl", FAMILY_GEN)
        out[name] = (hf_logits(case, FAMILY_REQUESTS), hf_generate(case, FAMILY_GEN),
                     hf_generate(case, [(ids, a, n) for ids, a, n, _ in ARRIVALS]))
    return root, out


@pytest.mark.parametrize("tp,ep,dispatcher", LAYOUTS,
                         ids=[f"tp{t}-ep{e}-{d}" for t, e, d in LAYOUTS])
def test_families_match_hf_peft_under_launch(cases, tp, ep, dispatcher, tmp_path):
    root, refs = cases
    _launch([sys.executable, "-m", "launch", "--nproc-per-node", str(tp), "--device", "cpu",
             "--timeout", "120", "-m", "tests.integration.test_e2e_families_launch", str(root),
             "--out", str(tmp_path), "--tp", str(tp), "--ep", str(ep),
             "--dispatcher", dispatcher])
    for name, (ref_logits, ref_tokens, ref_arrivals) in refs.items():
        got = json.loads((tmp_path / f"{name}_arrivals.json").read_text())
        assert got["tokens"] == ref_arrivals and got["preemptions"] > 0, name
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert len(got) == len(ref_logits)
        for i, ref in enumerate(ref_logits):
            torch.testing.assert_close(got[f"request_{i}"], ref, atol=ATOL, rtol=0,
                                       msg=f"{name} request {i}")
        lines = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert [x["output_ids"] for x in lines] == ref_tokens, name


def driver(argv: list[str] | None = None) -> int:
    """Run in each launched process: every family of ``root`` on one layout, like the CLI."""
    from moelora_dist.cli import generate, logits
    from moelora_dist.cli.common import build_engine, check_inputs, make_groups
    from moelora_dist.parallel.groups import destroy_parallel

    p = argparse.ArgumentParser()
    p.add_argument("root", type=Path)  # positional first: the launcher needs it before flags
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--ep", type=int, required=True)
    p.add_argument("--dispatcher", default="auto")
    ns = p.parse_args(argv)
    groups = None
    try:
        for name in FAMILIES:
            d = ns.root / name
            common = ["--model", str(d / "model"), "--adapter", f"a1={d / 'a1'}", "--adapter",
                      f"a2={d / 'a2'}", "--tp", str(ns.tp), "--ep", str(ns.ep), "--device", "cpu",
                      "--dispatcher", ns.dispatcher]
            parser = argparse.ArgumentParser()
            logits.add_arguments(parser)
            largs = parser.parse_args(common + ["--requests", str(d / "req.jsonl"),
                                                "--out", str(ns.out / f"{name}.safetensors")])
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
            generate.run(engine, groups, gargs, requests)  # same engine: adapters registered
            sargs = parser.parse_args(common + ["--requests", str(d / "gen.jsonl"), "--out",
                                                str(ns.out / "unused"), "--num-pages", "9",
                                                "--page-size", "4", "--max-batch-tokens", "6"])
            arrivals(build_engine(sargs, groups, cfg, paths, codec),
                     ns.out / f"{name}_arrivals.json")
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(driver())
