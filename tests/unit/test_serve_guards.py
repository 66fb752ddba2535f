"""The server's guards and request parsing, in process (no HTTP): where run-time adapter loads
may read (``..``, absolute paths, symlinks out of the root, a root that is itself a symlink),
the bearer check, unknown and non-neutral fields, and the mapping of sampling errors to the
field a client sent."""

import os

import pytest

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")

from moelora_dist.serve.protocol import (ChatRequest, CompletionRequest, RequestInvalid,  # noqa: E402
                                         check_neutral, choice_seed, parse_body,
                                         sampling_params)
from moelora_dist.serve.security import (Forbidden, Unauthorized, check_bearer,  # noqa: E402
                                         resolve_adapter_path)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "root" / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "root" / "out_link")
    os.symlink(tmp_path / "root" / "ok", tmp_path / "root" / "in_link")
    os.symlink(tmp_path / "root", tmp_path / "root_link")
    return tmp_path


def test_adapter_paths_stay_under_the_root(root):
    r = str(root / "root")
    assert resolve_adapter_path("ok", r, True) == str(root / "root" / "ok")
    assert resolve_adapter_path(str(root / "root" / "ok"), r, True) == str(root / "root" / "ok")
    assert resolve_adapter_path("in_link", r, True) == str(root / "root" / "ok")
    # a root given through a symlink: paths are compared after resolving both
    assert resolve_adapter_path("ok", str(root / "root_link"), True) == str(root / "root" / "ok")
    for bad in ("../outside", "ok/../../outside", "out_link", str(root / "outside"), "/etc"):
        with pytest.raises(Forbidden, match="outside --adapter-root"):
            resolve_adapter_path(bad, r, True)
    with pytest.raises(Forbidden, match="--enable-lora-loading"):
        resolve_adapter_path("ok", r, False)


def test_bearer_check():
    check_bearer("Bearer k1", "k1")
    check_bearer("bearer k1", "k1")
    for header, why in ((None, "needs an API key"), ("", "needs an API key"),
                        ("Basic k1", "needs an API key"), ("Bearer k2", "not valid"),
                        ("Bearer k", "not valid")):
        with pytest.raises(Unauthorized, match=why):
            check_bearer(header, "k1")


@pytest.mark.parametrize("body,field,fragment", [
    ({"model": "m", "prompt": [1], "what": 1}, "what", "unknown field 'what'"),
    ({"prompt": [1]}, "model", "field 'model'"),
    ({"model": "m", "prompt": [1], "n": 0}, "n", "field 'n'"),
    ({"model": "m", "prompt": {"x": 1}}, "prompt", "field 'prompt"),
    ({"model": "m", "prompt": [1], "stream_options": {"include_usage": True}},
     "stream_options", "needs stream"),
    ({"model": "m", "prompt": [1], "best_of": 3}, "best_of", "best_of"),
    ({"model": "m", "prompt": [1], "presence_penalty": 1.0}, "presence_penalty", "only 0"),
], ids=["unknown", "missing", "n0", "prompt_type", "stream_options", "best_of", "penalty"])
def test_completion_bodies_name_the_field(body, field, fragment):
    with pytest.raises(RequestInvalid, match=fragment) as exc:
        check_neutral(parse_body(CompletionRequest, body))
    assert exc.value.param == field


def test_sampling_errors_name_the_client_field():
    req = parse_body(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                   "logprobs": True, "top_logprobs": 40})
    with pytest.raises(RequestInvalid) as exc:
        sampling_params(req, max_tokens=4, logprobs=40, seed=None)
    assert exc.value.param == "top_logprobs"
    req = parse_body(CompletionRequest, {"model": "m", "prompt": "x", "min_p": 2})
    with pytest.raises(RequestInvalid) as exc:
        sampling_params(req, max_tokens=4, logprobs=None, seed=None)
    assert exc.value.param == "min_p"


def test_choice_seeds_differ_and_repeat():
    assert choice_seed(None, 3) is None
    seeds = [choice_seed(7, i) for i in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4 and seeds == [choice_seed(7, i)
                                                               for i in range(4)]


def test_serve_benchmark_warms_up_every_timed_case():
    """The timed cases' own mixed prefill+decode steps are captured before timing: each timed
    case runs once untimed (4 output tokens) after the decode-bucket warm-ups."""
    from benchmarks.serve.cases import warmup_cases

    timed = [dict(mode=m, concurrency=c, num_requests=c, prompt_len=512, output_len=128, seed=c)
             for m in ("base", "lora8") for c in (1, 64)]
    warm = warmup_cases(64, ("base", "lora8"), timed)
    assert {(w["mode"], w["concurrency"]) for w in warm if w["prompt_len"] == 16} == {
        (m, b) for m in ("base", "lora8") for b in (1, 2, 4, 8, 16, 32, 64)}
    again = [w for w in warm if w["prompt_len"] == 512]
    assert [(w["mode"], w["concurrency"], w["num_requests"], w["output_len"]) for w in again] \
        == [(t["mode"], t["concurrency"], t["num_requests"], 4) for t in timed]


def test_serve_benchmark_reads_the_step_counters_from_metrics():
    """The HTTP side's step counts come from the server's own /metrics text (the collector the
    server registers), the same counters the offline side reads from the engine."""
    from prometheus_client import generate_latest

    from benchmarks.serve.cases import parse_counters, step_columns
    from moelora_dist.engine.outputs import EngineMetrics
    from moelora_dist.serve.metrics import ServerMetrics

    class Loop:
        snapshot = type("S", (), dict(metrics=EngineMetrics(
            1, 0, 10, 20, 3, 8, 16, 1, 4, 0, 130, 120, {}, decode_steps=126, step_seconds=3.25),
            adapters=(), waiting=0))()

    text = generate_latest(ServerMetrics(Loop()).registry).decode()
    got = parse_counters(text)
    assert got == {"steps": 130.0, "decode_steps": 126.0, "step_seconds": 3.25}
    assert step_columns(got, 6.5) == dict(steps=130, decode_steps=126, ms_per_step=50.0,
                                          step_ms=25.0)


def test_engine_loop_hands_a_steps_outputs_over_during_the_next_forward():
    """Outputs of step N go to the event loop once step N+1's forward is queued
    (``after_launch``), not while the engine thread does step N+1's host work; the last
    step's outputs, with no step after them, go at once. Fake engine: each step gives one
    token (the step's number) to the request, which makes 3."""
    import asyncio

    from moelora_dist.engine.outputs import EngineMetrics, RequestOutput
    from moelora_dist.serve.loop import EngineLoop, queue_sink

    events = []

    class Engine:
        adapter_names = ()
        adapters = type("A", (), dict(servable=lambda self, a: True))()
        scheduler = type("S", (), dict(waiting=[]))()
        after_launch = None

        def __init__(self):
            self.running, self.n = {}, 0

        def has_unfinished(self):
            return bool(self.running)

        def add_request(self, rid, ids, params, adapter):
            self.running[rid] = 0

        def abort(self, rid):
            self.running.pop(rid, None)

        def step(self):
            n, self.n = self.n, self.n + 1
            events.append(f"host {n}")
            self.after_launch()
            events.append(f"launched {n}")
            self.running["r"] += 1
            done = self.running["r"] == 3
            if done:
                del self.running["r"]
            return [RequestOutput("r", [n], finished=done,
                                  finish_reason="length" if done else None)]

        def metrics(self):
            return EngineMetrics(0, 0, 0, 0, 0, 1, 16, 0, 1, 0, 0, 0, {})

        def keepalive(self):
            pass

        def shutdown(self):
            pass

    async def main():
        loop = EngineLoop(Engine(), 16, heartbeat_s=0.05)
        deliver = loop._deliver

        def recorded(outputs):  # on the engine thread, in order with its steps
            events.extend(f"delivered {o.new_token_ids[0]}" for o in outputs)
            deliver(outputs)

        loop._deliver = recorded
        q: asyncio.Queue = asyncio.Queue()
        loop.start()
        await asyncio.wrap_future(loop.add("r", [1, 2], None, None, queue_sink(q)))
        got = [await asyncio.wait_for(q.get(), 10) for _ in range(3)]
        loop.stop(deadline_s=1.0)
        return got

    got = asyncio.run(main())
    assert [(o.new_token_ids, o.finished) for o in got] == [([0], False), ([1], False),
                                                            ([2], True)]
    assert events == ["host 0", "launched 0", "host 1", "delivered 0", "launched 1",
                      "host 2", "delivered 1", "launched 2", "delivered 2"]
