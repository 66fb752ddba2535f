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

Tolerance as in tests/unit/test_e2e_families.py: fp32, ``ATOL = 1e-4`` (the checks are
``_check`` of tests/integration/test_e2e_launch.py).
"""

from __future__ import annotations

import sys

import pytest

from tests.integration.test_e2e_launch import ARRIVALS, _check, arrivals
from tests.launch_driver import launch_driver, run_layout

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
        out[name] = (case, hf_logits(case, FAMILY_REQUESTS), hf_generate(case, FAMILY_GEN),
                     hf_generate(case, [(ids, a, n) for ids, a, n, _ in ARRIVALS]))
    return root, out


@pytest.mark.parametrize("tp,ep,dispatcher", LAYOUTS,
                         ids=[f"tp{t}-ep{e}-{d}" for t, e, d in LAYOUTS])
def test_families_match_hf_peft_under_launch(cases, tp, ep, dispatcher, tmp_path):
    root, refs = cases
    launch_driver("tests.integration.test_e2e_families_launch", root, tmp_path, tp, ep,
                  dispatcher)
    _check(root, tmp_path, refs)


def driver(argv: list[str] | None = None) -> int:
    """Run in each launched process: every family of ``root`` on one layout, like the CLI, then
    the stream of ``ARRIVALS``."""
    return run_layout(argv, FAMILIES, arrivals=arrivals)


if __name__ == "__main__":
    sys.exit(driver())
