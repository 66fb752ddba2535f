"""The engine's Python API on a tiny random model (fp32 CPU): seeded sampling that does not
depend on batch company or preemption, greedy equivalences, text in and out (a tokenizer built
here), stop strings, streaming, abort, metrics, adapters added and removed while requests
run, and every refused request.
"""

import pytest
import torch

from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.engine import Engine
from moelora_dist.engine.prompts import RequestError
from moelora_dist.engine.sampling import SamplingError, SamplingParams
from moelora_dist.engine.text import TextCodec
from moelora_dist.errors import MoeloraError
from tests.engine_cases import adapter, drive, tiny_model

V = 448  # >= the test tokenizer's 420 ids


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_loras=2, vocab_size=V)


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    from tests.unit.test_text import _write

    return TextCodec.from_model_dir(_write(tmp_path_factory.mktemp("tok")))


def _engine(model, codec=None, capture=None, **kw):
    cfg = dict(max_loras=2, max_rank=8, page_size=4, num_pages=64, max_graph_tokens=16)
    engine = Engine(model, EngineConfig(**{**cfg, **kw}), codec, capture=capture)
    for i, rank in enumerate((4, 8)):
        name = f"a{i}"
        if model.pool.slot_of(name) is not None:
            model.pool.release_batch()
            model.pool.unload(name)
        engine.add_adapter(name, adapter(name, model.cfg, rank, seed=10 + i))
    return engine


SAMPLED = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=5,
                         ignore_eos=True)


def test_seeded_sampling_ignores_batch_company_and_preemption(model):
    g = torch.Generator().manual_seed(0)
    others = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in (9, 3, 14, 6, 11)]
    target = [5, 6, 7, 8, 9, 10]
    alone = drive(_engine(model), [target], ["a0"], SAMPLED)[0][0]
    params = [SAMPLED] + [SamplingParams(max_tokens=6, temperature=1.2, seed=i, ignore_eos=True)
                          for i in range(5)]
    crowd = _engine(model, num_pages=9, max_num_batched_tokens=8)  # tiny: preempts
    got = drive(crowd, [target] + others, ["a0", None, "a1", "a0", None, "a1"], params,
                [1, 0, 0, 0, 1, 2])[0][0]
    assert crowd.scheduler.num_preemptions > 0
    static = drive(_engine(model, capture=False), [target], ["a0"], SAMPLED)[0][0]
    assert got == alone == static and len(alone) == 8
    other_seed = drive(_engine(model), [target], ["a0"],
                       SamplingParams(**{**SAMPLED.to_dict(), "seed": 6}))[0][0]
    assert other_seed != alone  # the seed matters, so the equalities above mean something


def test_top_k_1_and_temperature_0_are_greedy(model):
    prompts = [[3, 4, 5], [9, 8, 7, 6]]
    greedy = drive(_engine(model), prompts, [None, "a1"],
                   SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    top1 = drive(_engine(model), prompts, [None, "a1"],
                 SamplingParams(max_tokens=6, temperature=1.5, top_k=1, seed=3,
                                ignore_eos=True))
    assert [greedy[i][0] for i in range(2)] == [top1[i][0] for i in range(2)]


def test_text_prompts_chat_and_incremental_text(model, codec):
    engine = _engine(model, codec)
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = engine.generate(["Hello world", [{"role": "user", "content": "日本語 😀"}]], p)
    assert outs[0].prompt_ids == codec.encode("Hello world")
    assert outs[1].prompt_ids == codec.apply_chat_template(
        [{"role": "user", "content": "日本語 😀"}])
    for c in outs:
        assert c.text == codec.decode(c.output_ids) and c.finish_reason == "length"
    deltas = [o for o in engine.stream(["Hello world"], p)]
    assert "".join(o.text_delta for o in deltas) == outs[0].text
    assert [t for o in deltas for t in o.new_token_ids] == outs[0].output_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"


def test_stop_string_cuts_the_text(model, codec):
    engine = _engine(model, codec)
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    free = engine.generate(["Hello world"], p)[0]
    assert len(free.text) >= 4
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 2]
    cut = engine.generate(["Hello world"], SamplingParams(**{**p.to_dict(), "stop": [stop]}))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    assert cut.output_ids == free.output_ids[:len(cut.output_ids)]
    assert len(cut.output_ids) < len(free.output_ids)


def test_abort_frees_pages_at_once_and_metrics_follow(model):
    engine = _engine(model)
    p = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine.add_request("x", list(range(1, 30)), p, "a0")
    engine.add_request("y", [4, 5], p, "a1")
    engine.add_request("z", [6], p)
    engine.step()
    m = engine.metrics()
    assert (m.running, m.waiting) == (3, 0) and m.pages_used >= 8 + 1 + 1
    assert m.adapters["a0"].running == 1 and m.slots_used == 2 and m.slots_total == 2
    used, held = engine.pages.num_used, len(engine.pages.table("x"))
    assert held == 8  # 29 prompt tokens + 1 in pages of 4
    assert engine.abort("x") and not engine.abort("x")
    assert engine.pages.num_used == used - held and engine.metrics().running == 2
    assert engine.model.pool.pinned == frozenset({engine.model.pool.slot_of("a1")})
    while engine.has_unfinished():
        engine.step()
    m = engine.metrics()
    assert m.running == m.pages_used == 0 and m.adapters["a1"].finished == 1
    assert m.output_tokens == 1 + 2 * 20 and m.steps == 20  # one prefill step + 19 decodes


def test_adapter_removed_while_its_request_runs(model):
    engine = _engine(model)
    p = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = drive(_engine(model), [[3, 4, 5]], ["a1"], p)[0][0]
    engine.add_request("r", [3, 4, 5], p, "a1")
    got = [t for out in engine.step() for t in out.new_token_ids]
    engine.remove_adapter("a1")
    assert "a1" not in engine.adapter_names
    with pytest.raises(RequestError, match="being removed"):
        engine.add_request("s", [1], p, "a1")
    while engine.has_unfinished():
        got += [t for out in engine.step() for t in out.new_token_ids]
    assert got == want  # it finished on a1's weights
    engine.step()  # no request uses a1 any more: it leaves now
    assert engine.model.pool.slot_of("a1") is None and "a1" not in engine.adapters.registry
    engine.add_adapter("a1", adapter("a1", model.cfg, 8, seed=11))  # and can come back


def test_in_memory_adapter_added_while_requests_run(model):
    engine = _engine(model)
    p = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request("base", [7, 8, 9], p)
    engine.step()
    engine.remove_adapter("a0")
    engine.add_adapter("n0", adapter("n0", model.cfg, 4, seed=10))  # a0's weights, new name
    engine.add_request("new", [3, 4, 5], p, "n0")
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    ref = drive(_engine(model), [[3, 4, 5]], ["a0"], p)[0][0]
    assert outs["new"] == ref


@pytest.mark.parametrize("call,error,match", [
    (lambda e: e.add_request("d", [1], SamplingParams(max_tokens=2)), RequestError,
     "already running"),
    (lambda e: e.add_request("q", list(range(1, 200)), SamplingParams(max_tokens=100)),
     RequestError, "exceed the model's 256 positions"),
    (lambda e: e.add_request("q", list(range(1, 200)), SamplingParams(max_tokens=40)),
     RequestError, "need 60 KV pages of 4 tokens but the pool has 32"),
    (lambda e: e.add_request("q", [1], adapter="nope"), RequestError, "unknown adapter 'nope'"),
    (lambda e: e.add_request("q", [V]), RequestError, "outside the vocabulary"),
    (lambda e: e.add_request("q", []), RequestError, "input_ids is empty"),
    (lambda e: e.add_request("q", "text"), RequestError, "needs a tokenizer"),
    (lambda e: e.add_request("q", [1], SamplingParams(stop=("x",))), RequestError,
     "stop strings need the model's tokenizer"),
    (lambda e: e.add_request("q", [1], SamplingParams(logprobs=21)), SamplingError,
     "'logprobs'"),
    (lambda e: e.remove_adapter("nope"), MoeloraError, "not registered"),
    (lambda e: e.add_adapter("a0", adapter("a0", e.cfg, 4, seed=1)), MoeloraError,
     "already registered"),
    (lambda e: e.follow(), MoeloraError, "follow\\(\\) runs on the follower ranks"),
], ids=["duplicate_id", "too_long", "too_many_pages", "unknown_adapter", "bad_token", "empty",
        "text_without_tokenizer", "stop_without_tokenizer", "bad_logprobs", "remove_unknown",
        "add_twice", "follow_on_leader"])
def test_refused_requests_and_calls(model, call, error, match):
    engine = _engine(model, num_pages=32)
    engine.add_request("d", [1], SamplingParams(max_tokens=2))
    with pytest.raises(error, match=match):
        call(engine)
    assert engine.scheduler.find("q") is None  # nothing half-queued
