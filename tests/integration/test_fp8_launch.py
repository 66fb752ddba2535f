"""FP8 checkpoints under the launcher (gloo CPU processes) at (tp, ep) = (2, 2) and (4, 2):
logits and greedy tokens of every family against transformers + PEFT, as on one process
(tests/unit/test_fp8_e2e.py; the tolerance and its reason are in tests/fp8_checks.py).

(2, 2): EP owns whole experts (2 per rank), attention and the dense MLP split over 2 ranks.
(4, 2): moe_tp = 2 cuts ``I = 256`` into 128-column shards (one FP8 block each), attention
heads 1 per rank with kv heads replicated over 2 ranks, o_proj and the dense down_proj cut on
128-column blocks. Each launch also runs the ``--dequantize-fp8`` path, which must equal
transformers' own FP8 path to the fp32 tolerance (1e-4): the sliced scales are exact.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.launch_driver import launch_driver, run_layout

ATOL = 1e-4
LAYOUTS = [(2, 2, "all_to_all"), (4, 2, "all_reduce")]
CASES = {"qwen3_hybrid": ("qwen3_moe", {"hybrid": True}), "mixtral": ("mixtral", {}),
         "olmoe": ("olmoe", {})}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from tests.e2e_cases import GEN_REQUESTS, REQUESTS, write_requests
    from tests.fp8_factory import build_fp8_case

    root = tmp_path_factory.mktemp("fp8_launch")
    out = {}
    for name, (arch, opts) in CASES.items():
        case = build_fp8_case(arch, root / name, **opts)
        write_requests(root / name / "req.jsonl", REQUESTS)
        write_requests(root / name / "gen.jsonl", GEN_REQUESTS)
        with torch.no_grad():
            plain = [case.hf_plain[a](input_ids=torch.tensor([ids])).logits[0].float()
                     for ids, a in REQUESTS]
            quant = [case.hf[a](input_ids=torch.tensor([ids])).logits[0].float()
                     for ids, a in REQUESTS]
        out[name] = (case, plain, quant)
    return root, out


@pytest.mark.parametrize("tp,ep,dispatcher", LAYOUTS, ids=[f"tp{t}-ep{e}" for t, e, _ in LAYOUTS])
def test_fp8_every_arch_under_launch(cases, tp, ep, dispatcher, tmp_path):
    from tests.e2e_cases import GEN_REQUESTS
    from tests.fp8_checks import assert_fp8_close, greedy_matches_up_to_ties

    root, refs = cases
    launch_driver("tests.integration.test_fp8_launch", root, tmp_path, tp, ep, dispatcher)
    for name, (case, plain, quant) in refs.items():
        got = load_file(str(tmp_path / f"{name}.dequant.safetensors"))
        for i, ref in enumerate(plain):
            torch.testing.assert_close(got[f"request_{i}"], ref, atol=ATOL, rtol=0,
                                       msg=f"{name} --dequantize-fp8 request {i}")
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert_fp8_close([got[f"request_{i}"] for i in range(len(quant))], quant, name)
        lines = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        problem = greedy_matches_up_to_ties([x["output_ids"] for x in lines], case.hf,
                                            GEN_REQUESTS)
        assert problem is None, f"{name}: {problem}"


def driver(argv: list[str] | None = None) -> int:
    """Run in each launched process: every case of ``root`` on one layout, like the CLI, with
    ``--dequantize-fp8`` and without (``generate`` runs on the FP8 engine of the last pass)."""
    return run_layout(argv, CASES, logits_variants=((["--dequantize-fp8"], ".dequant"), ([], "")))


if __name__ == "__main__":
    sys.exit(driver())
