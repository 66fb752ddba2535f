"""``moelora-dist serve`` over real HTTP on the loopback, with the official ``openai`` client.

One server (a subprocess: the tiny Qwen3-MoE of tests/e2e_cases.py with a tokenizer built
here, adapters a1 and a2, an API key, run-time loading under an adapter root, at most 64
waiting requests) serves every test of this file; the last test stops it with SIGTERM.
References: the engine run offline in this process (greedy), itself pinned to
transformers+PEFT by ``test_offline_reference_is_transformers_peft`` and the e2e tests.

What each test proves is in its docstring. Time: ~40 s to build the model and adapters, ~15 s
to start the server, ~60 s of tests on a 2-core machine.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import time

import httpx
import openai
import pytest

from tests.integration.launching import ROOT, job_env
from tests.integration.serving import (STARTUP_S, Server, build_serve_case, greedy,
                                       offline_engine)

KEY = "test-key-123"
MODELS = ("qwen-tiny", "a1", "a2")  # the base model's served name, then the adapters
PROMPTS = [[3, 4, 5, 6], "hello world how are", [40, 41, 42]]
CHAT = [{"role": "user", "content": "tell me a story about a cat"}]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    case = build_serve_case(root)
    return root, case, offline_engine(case)


def _serve_args(case) -> list[str]:
    return ["--model", str(case.model_dir), *case.adapter_args(), "--served-model-name",
            MODELS[0], "--enable-lora-loading", "--adapter-root", str(case.loadable),
            "--max-waiting", "64", "--shutdown-timeout", "20", "--max-model-len", "512"]


@pytest.fixture(scope="module")
def env(built):
    root, case, engine = built
    with Server(_serve_args(case), root / "server.log", api_key=KEY) as server:
        yield case, server, engine


def _adapter(model: str):
    return None if model == MODELS[0] else model


def test_offline_reference_is_transformers_peft(env):
    """The offline engine the server is compared with equals HF+PEFT generate, one request
    at a time (so server == offline implies server == transformers+PEFT)."""
    from tests.e2e_cases import GEN_REQUESTS, hf_generate

    case, _, engine = env
    got = greedy(engine, [r[0] for r in GEN_REQUESTS], [r[1] for r in GEN_REQUESTS],
                 [r[2] for r in GEN_REQUESTS])
    assert [ids for ids, _ in got] == hf_generate(case, GEN_REQUESTS)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_equal_offline_for_base_and_each_adapter(env, stream):
    """Token ids and text of greedy completions, for the base model and each adapter, equal
    the offline engine's; and the adapters change the output (the test would see a dropped
    adapter)."""
    _, server, engine = env
    client = server.client()
    outputs = {}
    for model in MODELS:
        want = greedy(engine, PROMPTS, [_adapter(model)] * len(PROMPTS), [6] * len(PROMPTS))
        for prompt, (ids, text) in zip(PROMPTS, want):
            kw = dict(model=model, prompt=prompt, max_tokens=6, temperature=0,
                      extra_body={"return_token_ids": True})
            if stream:
                got_ids, got_text, reason = [], "", None
                for chunk in client.completions.create(stream=True, **kw):
                    c = chunk.choices[0]
                    got_ids += c.model_extra["token_ids"]
                    got_text += c.text
                    reason = c.finish_reason or reason
            else:
                r = client.completions.create(**kw)
                c = r.choices[0]
                got_ids, got_text, reason = c.model_extra["token_ids"], c.text, c.finish_reason
                assert r.usage.completion_tokens == len(ids)
            assert (got_ids, got_text) == (ids, text), (model, prompt)
            assert reason == ("stop" if ids[-1] == 1 else "length")
            outputs[model, str(prompt)] = ids
    for prompt in PROMPTS:  # each adapter must matter for at least one prompt
        assert outputs["a1", str(prompt)] != outputs[MODELS[0], str(prompt)] or \
            outputs["a2", str(prompt)] != outputs[MODELS[0], str(prompt)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_equals_offline_with_the_chat_template(env, stream):
    """Chat completions: the messages go through the model's chat template and the greedy
    reply equals the offline engine's on the same messages; streams open with the role."""
    _, server, engine = env
    client = server.client()
    for model in MODELS:
        (ids, text), = greedy(engine, [CHAT], [_adapter(model)], [8])
        kw = dict(model=model, messages=CHAT, max_tokens=8, temperature=0)
        if stream:
            chunks = list(client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kw))
            assert chunks[0].choices[0].delta.role == "assistant"
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
        else:
            r = client.chat.completions.create(**kw)
            content = r.choices[0].message.content
            assert r.choices[0].message.role == "assistant"
            assert r.usage.completion_tokens == len(ids)
        assert content == text, model


def test_sampling_n_seed_stop_logprobs_echo(env):
    """The sampling options reach the engine: a seeded sample equals the offline engine's
    with the same seed (and repeats), ``n`` choices have their own seeds, a stop string cuts
    the text (finish "stop"), logprobs (completions and chat) equal the offline engine's, and
    echo returns the prompt with null first logprob."""
    from moelora_dist.engine.sampling_params import SamplingParams

    _, server, engine = env
    client = server.client()
    sampled = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=7)
    want = engine.generate([[3, 4, 5]], sampled, "a1")[0]
    kw = dict(model="a1", prompt=[3, 4, 5], max_tokens=8, temperature=1.0, seed=7,
              extra_body={"top_k": 20, "return_token_ids": True})
    first = client.completions.create(n=3, **kw)
    again = client.completions.create(n=3, **kw)
    ids = [c.model_extra["token_ids"] for c in first.choices]
    assert ids[0] == want.output_ids and ids == [c.model_extra["token_ids"]
                                                 for c in again.choices]
    assert len({tuple(x) for x in ids}) > 1, "n choices share one random stream"
    assert first.usage.prompt_tokens == 3 and first.usage.completion_tokens == sum(map(len, ids))

    (gids, text), = greedy(engine, ["hello world how are"], ["a2"], [8])
    stop = text[3:5]
    r = client.completions.create(model="a2", prompt="hello world how are", max_tokens=8,
                                  temperature=0, stop=[stop])
    assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"

    ref = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=5, temperature=0, logprobs=2,
                                                      prompt_logprobs=2), "a2")[0]
    r = client.completions.create(model="a2", prompt=[3, 4, 5], max_tokens=5, temperature=0,
                                  logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == 3 + 5 and r.choices[0].text.startswith(
        engine.codec.decode([3, 4, 5]))
    got = [x for x in lp.token_logprobs[1:]]
    exp = [p.logprob for p in ref.prompt_logprobs[1:]] + [p.logprob for p in ref.logprobs]
    assert got == pytest.approx(exp, abs=1e-5)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    c = client.chat.completions.create(model="a2", messages=CHAT, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    ref = engine.generate([CHAT], SamplingParams(max_tokens=4, temperature=0, logprobs=3),
                          "a2")[0]
    content = c.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx([p.logprob for p in ref.logprobs],
                                                         abs=1e-5)
    assert all(len(e.top_logprobs) == 3 for e in content)


def test_32_concurrent_streams_mixing_adapters_have_no_cross_talk(env):
    """32 streams at once over base, a1 and a2 with different prompts and lengths: each
    equals its own offline result, and all finish within a bounded time."""
    _, server, engine = env
    jobs = [(MODELS[i % 3], [5 + i, 6 + (i * 7) % 50, 9 + i % 11], 4 + i % 9) for i in range(32)]
    want = greedy(engine, [p for _, p, _ in jobs], [_adapter(m) for m, _, _ in jobs],
                  [n for _, _, n in jobs])

    def run(job):
        model, prompt, n = job
        client = server.client()
        ids = []
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=n,
                                               temperature=0, stream=True,
                                               extra_body={"return_token_ids": True}):
            ids += chunk.choices[0].model_extra["token_ids"]
        return ids

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(run, jobs))
    took = time.monotonic() - start
    assert got == [ids for ids, _ in want]
    assert took < 120, f"32 streams took {took:.0f} s"


def test_load_use_unload_while_other_adapters_stream(env):
    """A run-time load (a3 is a copy of a1, so its outputs must be a1's), its use, and its
    unload while a2 streams and while a3's own request is in flight: the in-flight request
    finishes first with every token, /v1/models follows, later requests get 404."""
    _, server, engine = env
    client = server.client()
    r = server.post("/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": "a3"})
    assert r.status_code == 200, r.text
    models = {m.id: m for m in client.models.list().data}
    assert models["a3"].model_extra["parent"] == MODELS[0]
    (a1_ids, _), = greedy(engine, [[7, 8, 9]], ["a1"], [6])
    got = client.completions.create(model="a3", prompt=[7, 8, 9], max_tokens=6, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert got.choices[0].model_extra["token_ids"] == a1_ids

    (long_a1, _), (long_a2, _) = greedy(engine, [[11, 12], [13, 14]], ["a1", "a2"], [60, 60])
    streams = [client.completions.create(model=m, prompt=p, max_tokens=60, temperature=0,
                                         stream=True, extra_body={"return_token_ids": True})
               for m, p in (("a3", [11, 12]), ("a2", [13, 14]))]
    firsts = [next(iter(s)) for s in streams]  # both are running now
    r = server.post("/v1/unload_lora_adapter", {"lora_name": "a3"})
    assert r.status_code == 200, r.text
    assert "a3" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError, match="a3"):
        client.completions.create(model="a3", prompt=[1, 2], max_tokens=2)
    for first, s, want in zip(firsts, streams, (long_a1, long_a2)):
        ids = first.choices[0].model_extra["token_ids"]
        for chunk in s:
            ids += chunk.choices[0].model_extra["token_ids"]
        assert ids == want


BAD = [  # (path, body, status, message fragment, param)
    ("/v1/completions", {"model": "nope", "prompt": [1]}, 404, "['qwen-tiny', 'a1', 'a2'", None),
    ("/v1/completions", {"model": "a1", "prompt": [5] * 500, "max_tokens": 20}, 400,
     "maximum context length is 512 tokens, but 520 were asked (500 in the prompt", "prompt"),
    ("/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "the "
                                                           * 600}]}, 400, "512 tokens", "messages"),
    ("/v1/completions", {"model": "a1", "prompt": [1], "top_p": 7}, 400, "top_p", "top_p"),
    ("/v1/completions", {"model": "a1", "prompt": [1], "temperature": -1}, 400, "temperature",
     "temperature"),
    ("/v1/completions", {"model": "a1", "prompt": [1], "max_tokens": 0}, 400, "max_tokens",
     "max_tokens"),
    ("/v1/completions", {"model": "a1", "prompt": [1], "n": 0}, 400, "'n'", "n"),
    ("/v1/completions", {"model": "a1", "prompt": [1], "logprobs": 50}, 400, "logprobs",
     "logprobs"),
    ("/v1/completions", {"model": "a1", "prompt": [1], "frequency_penalty": 0.5}, 400,
     "frequency_penalty", "frequency_penalty"),
    ("/v1/completions", {"model": "a1", "prompt": [1], "bogus": 1}, 400, "unknown field 'bogus'",
     "bogus"),
    ("/v1/completions", {"model": "a1", "prompt": [500]}, 400, "outside the vocabulary",
     "prompt"),
    ("/v1/completions", b"{not json", 400, "not valid JSON", None),
    ("/v1/completions", {"model": "a1", "prompt": [1], "n": 80}, 429, "--max-waiting", None),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "broken"}, 400,
     "r='eight'; the LoRA rank must be a positive integer", None),
    ("/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": "a3"}, 400, "already", None),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../outside"}, 403,
     "outside --adapter-root", None),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "escape"}, 403,
     "outside --adapter-root", None),
    ("/v1/unload_lora_adapter", {"lora_name": "never"}, 404, "never", None),
]


def test_every_bad_input_gets_its_status_and_message(env):
    """Each bad request: its status, OpenAI's error shape, a message naming the problem and
    the field; afterwards every loaded adapter still serves exactly as before."""
    _, server, engine = env
    for path, body, status, fragment, param in BAD:
        r = server.post(path, body)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert fragment in err["message"], (body, err)
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
        assert err["param"] == param, (body, err)
    names = {m.id for m in server.client().models.list().data}
    assert {"a1", "a2"} <= names and "x" not in names
    test_completions_equal_offline_for_base_and_each_adapter(env, False)


def test_api_key_is_required_except_on_health(env):
    """Without the key (or with a wrong one) every route but /health answers 401."""
    _, server, _ = env
    assert httpx.get(server.url + "/health").status_code == 200
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + path).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json={"model": "a1", "prompt": [1]},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_disconnect_mid_stream_frees_pages(env):
    """A client that closes its stream after the first token: the request is cancelled, its
    KV pages return to the pool (gauge back to 0) long before it would have finished."""
    _, server, _ = env
    before = server.metrics()
    body = {"model": "a2", "prompt": [5, 6, 7], "max_tokens": 500, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers=server.headers(), timeout=30) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        during = server.metrics()  # (leaving the iterator closes the connection)
    assert during["moelora_kv_pages_used"] > 0 and during["moelora_requests_running"] == 1
    deadline = time.monotonic() + 10
    while (m := server.metrics())["moelora_kv_pages_used"] > 0 or \
            m["moelora_requests_running"] > 0:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    made = m["moelora_generation_tokens_total"] - before["moelora_generation_tokens_total"]
    assert made < 500, f"the request ran to the end ({made} tokens): not cancelled"
    assert m['moelora_requests_total{model="a2",status="abort"}'] >= 1


def test_disconnect_while_waiting_for_a_whole_response_cancels_it(env):
    """A client of a non-streamed request that gives up (its read times out and it closes
    the connection): the request is cancelled, its pages freed, and the server's handler
    returns (the next requests are served as before)."""
    _, server, _ = env
    before = server.metrics()
    body = {"model": "a1", "prompt": [8, 9], "max_tokens": 500, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", body, timeout=1.0)
    aborted = 'moelora_requests_total{model="a1",status="abort"}'
    deadline = time.monotonic() + 10
    while (m := server.metrics()).get(aborted, 0) < before.get(aborted, 0) + 1:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["moelora_kv_pages_used"] == 0 and m["moelora_requests_running"] == 0
    made = m["moelora_generation_tokens_total"] - before["moelora_generation_tokens_total"]
    assert made < 500, f"the request ran to the end ({made} tokens): not cancelled"


def test_sigterm_finishes_running_requests_then_exits_0(env):
    """SIGTERM while a stream runs: new connections are refused, the stream still gets every
    token, and the server exits 0 within the shutdown deadline. (Runs last: it stops the
    module's server.)"""
    _, server, engine = env
    from moelora_dist.engine.sampling_params import SamplingParams

    want = engine.generate([[21, 22, 23]], SamplingParams(max_tokens=300, temperature=0,
                                                          ignore_eos=True), "a1")[0].output_ids
    stream = server.client().completions.create(
        model="a1", prompt=[21, 22, 23], max_tokens=300, temperature=0, stream=True,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    chunks = iter(stream)
    ids = next(chunks).choices[0].model_extra["token_ids"]
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while True:  # the listener closes at once, while the stream goes on
        try:
            httpx.get(server.url + "/health", timeout=1)
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    assert server.proc.poll() is None
    for chunk in chunks:
        ids += chunk.choices[0].model_extra["token_ids"]
    assert ids == want
    assert server.proc.wait(timeout=30) == 0, server.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)


@pytest.mark.parametrize("frontend", ["process", "thread"])
def test_both_frontends_stream_load_unload_and_drain_on_sigterm(built, frontend):
    """``--frontend process`` (HTTP in a child process, fed through a socket) and ``thread``
    (HTTP on the engine's process): a stream equals the offline engine's, a run-time load
    serves and unloads, and SIGTERM lets a running stream finish, then exits 0."""
    from moelora_dist.engine.sampling_params import SamplingParams

    root, case, engine = built
    with Server([*_serve_args(case), "--frontend", frontend], root / f"{frontend}.log",
                api_key=KEY) as server:
        client = server.client()
        (ids, text), = greedy(engine, [PROMPTS[1]], ["a2"], [6])
        chunks = list(client.completions.create(model="a2", prompt=PROMPTS[1], max_tokens=6,
                                                temperature=0, stream=True,
                                                extra_body={"return_token_ids": True}))
        assert sum((c.choices[0].model_extra["token_ids"] for c in chunks), []) == ids
        assert "".join(c.choices[0].text for c in chunks) == text
        assert server.post("/v1/load_lora_adapter",
                           {"lora_name": "a3", "lora_path": "a3"}).status_code == 200
        assert "a3" in {m.id for m in client.models.list().data}
        (a1_ids, _), = greedy(engine, [[7, 8, 9]], ["a1"], [6])
        got = client.completions.create(model="a3", prompt=[7, 8, 9], max_tokens=6,
                                        temperature=0, extra_body={"return_token_ids": True})
        assert got.choices[0].model_extra["token_ids"] == a1_ids
        assert server.post("/v1/unload_lora_adapter", {"lora_name": "a3"}).status_code == 200
        assert "a3" not in {m.id for m in client.models.list().data}

        want = engine.generate([[21, 22]], SamplingParams(max_tokens=200, temperature=0,
                                                          ignore_eos=True), "a1")[0].output_ids
        stream = iter(client.completions.create(
            model="a1", prompt=[21, 22], max_tokens=200, temperature=0, stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True}))
        ids = next(stream).choices[0].model_extra["token_ids"]
        server.proc.send_signal(signal.SIGTERM)
        for chunk in stream:
            ids += chunk.choices[0].model_extra["token_ids"]
        assert ids == want
        assert server.proc.wait(timeout=30) == 0, server.log()
        assert "Traceback" not in server.log(), server.log()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(x) for x in fh.read().split()]


def test_a_frontend_that_dies_ends_the_server_with_1(built):
    """The HTTP frontend child killed (SIGKILL): the engine process stops and exits 1, at
    once, not waiting for anything."""
    root, case, _ = built
    with Server(_serve_args(case), root / "killed.log") as server:
        frontend, = _children(server.proc.pid)
        os.kill(frontend, signal.SIGKILL)
        assert server.proc.wait(timeout=30) == 1, server.log()
        assert "the HTTP frontend exited with code -9" in server.log()


def test_a_port_in_use_is_one_error_and_exit_1(built):
    """Binding fails in the frontend child: the server exits 1 with uvicorn's one-line reason
    and ours, instead of hanging."""
    root, case, _ = built
    server = Server(_serve_args(case), root / "bind.log")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.port))
        taken.listen()
        proc = subprocess.run(server.cmd, cwd=ROOT, env=job_env(), capture_output=True,
                              text=True, timeout=STARTUP_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "address already in use" in out and "before it listened on 127.0.0.1" in out, out
    assert "Traceback" not in out, out


def test_under_the_launcher_tp2_ep2_gives_the_same_greedy_outputs(built):
    """``python -m launch --nproc-per-node 2 serve --tp 2 --ep 2`` on gloo: rank 0 serves,
    rank 1 follows its plans; greedy outputs (whole and streamed, base and adapters, and an
    adapter loaded at run time, which the follower reads from its own copy) equal the
    single-process offline engine's. With a collective timeout of 8 s, 10 s of idleness in
    between must not end the job (the leader's keep-alives). SIGTERM to the launcher stops
    every rank within the deadline."""
    root, case, engine = built
    args = [*_serve_args(case), "--tp", "2", "--ep", "2"]
    launch = ["--nproc-per-node", "2", "--timeout", "8"]
    with Server(args, root / "launch.log", launch=launch) as server:
        client = server.client()
        for model in MODELS:
            want = greedy(engine, PROMPTS, [_adapter(model)] * len(PROMPTS), [6] * 3)
            for prompt, (ids, text) in zip(PROMPTS, want):
                kw = dict(model=model, prompt=prompt, max_tokens=6, temperature=0,
                          extra_body={"return_token_ids": True})
                whole = client.completions.create(**kw).choices[0]
                assert (whole.model_extra["token_ids"], whole.text) == (ids, text), model
                streamed = [c.choices[0].model_extra["token_ids"]
                            for c in client.completions.create(stream=True, **kw)]
                assert sum(streamed, []) == ids
        time.sleep(10)  # idle past the collective timeout
        assert server.post("/v1/load_lora_adapter",
                           {"lora_name": "a3", "lora_path": "a3"}).status_code == 200
        (a1_ids, _), = greedy(engine, [[7, 8, 9]], ["a1"], [6])
        got = client.completions.create(model="a3", prompt=[7, 8, 9], max_tokens=6,
                                        temperature=0, extra_body={"return_token_ids": True})
        assert got.choices[0].model_extra["token_ids"] == a1_ids
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=60)
        assert code in (0, 128 + signal.SIGTERM), server.log()
        assert "Traceback" not in server.log(), server.log()
