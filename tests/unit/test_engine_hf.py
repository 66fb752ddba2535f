"""The engine equals transformers+PEFT ``generate`` run one request at a time, on one process,
for requests that arrive while others decode: mixed adapters and base, a prompt longer than a
prefill chunk, and a page pool so small that sequences are preempted and recomputed.
Log-probabilities (generated and prompt tokens) equal ``log_softmax`` of the HF logits.

Tolerance (fp32 on CPU, as test_e2e_single.py): the logits agree to ~1e-6, so greedy tokens
agree exactly and log-probabilities to ``ATOL = 1e-4``.
"""

import pytest
import torch

from moelora_dist.engine.engine import Engine
from moelora_dist.engine.sampling import SamplingParams
from tests.e2e_cases import build_case
from tests.engine_cases import drive

ATOL = 1e-4
# (prompt, adapter, max new tokens, step it arrives at)
ARRIVALS = [
    (list(range(3, 16)), "a1", 6, 0),       # 13 prompt tokens: three chunks of <= 6
    ([9, 10], None, 5, 0),
    (list(range(11, 20)), "a2", 4, 1),
    ([20, 21, 22], "a1", 6, 3),
    ([30], "a2", 3, 3),
    ([40, 41, 42, 43], None, 5, 6),
]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return build_case("qwen3_moe", tmp_path_factory.mktemp("engine_hf"))


def _engine(case, **kw):
    return Engine.from_pretrained(str(case.model_dir), adapters={
        n: str(p) for n, p in case.adapter_dirs.items()}, max_loras=2, max_rank=8,
        progress=False, page_size=4, **kw)


@torch.no_grad()
def _hf_generate(case, ids, adapter, n):
    seq = case.hf[adapter].generate(input_ids=torch.tensor([ids]), max_new_tokens=n,
                                    do_sample=False)
    return seq[0, len(ids):].tolist()


def test_arrivals_chunks_and_preemption_match_hf_generate(case):
    engine = _engine(case, num_pages=9, max_num_batched_tokens=6)
    chunks = []
    real = engine.scheduler.schedule

    def spy(**kw):
        out = real(**kw)
        chunks.extend(n for s, n in (out.entries if out is not None else [])
                      if s.request_id == "0" and s.num_computed < s.num_prompt)
        return out

    engine.scheduler.schedule = spy
    params = [SamplingParams(max_tokens=n, temperature=0.0) for _, _, n, _ in ARRIVALS]
    done = drive(engine, [r[0] for r in ARRIVALS], [r[1] for r in ARRIVALS], params,
                 [r[3] for r in ARRIVALS])
    for i, (ids, adapter, n, _) in enumerate(ARRIVALS):
        assert done[i][0] == _hf_generate(case, ids, adapter, n), i
    assert engine.scheduler.num_preemptions > 0  # the pool of 9 pages forced recompute
    assert len(chunks) >= 3  # request 0's prompt was prefilled in several chunks
    assert engine.pages.num_used == 0


def test_logprobs_equal_hf_log_softmax(case):
    engine = _engine(case, num_pages=64, max_num_batched_tokens=5)
    prompts = [r[0] for r in ARRIVALS[:4]]
    names = [r[1] for r in ARRIVALS[:4]]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=2,
                            ignore_eos=True)
    outs = engine.generate(prompts, params, names)
    for ids, adapter, c in zip(prompts, names, outs):
        full = torch.tensor([ids + c.output_ids])
        with torch.no_grad():
            logp = torch.log_softmax(case.hf[adapter](input_ids=full).logits[0].float(), -1)
        assert len(c.logprobs) == 4 and c.prompt_logprobs[0] is None
        for k, lp in enumerate(c.logprobs):
            row = logp[len(ids) - 1 + k]
            assert lp.token_id == c.output_ids[k] == int(row.argmax())
            assert abs(lp.logprob - float(row[lp.token_id])) < ATOL
            top = torch.topk(row, 3)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top.values,
                                       atol=ATOL, rtol=0)
        assert len(c.prompt_logprobs) == len(ids)
        for p, lp in enumerate(c.prompt_logprobs[1:], start=1):
            assert lp.token_id == ids[p] and abs(lp.logprob - float(logp[p - 1, ids[p]])) < ATOL
            assert [t for t, _ in lp.top] == torch.topk(logp[p - 1], 2).indices.tolist()
