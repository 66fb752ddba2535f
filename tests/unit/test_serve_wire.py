"""The frontend process's wire (``serve/wire.py``) and its two ends in process: JSON round trips
of every message's payload, frames split and joined at any byte, the frontend's
:class:`RemoteLoop` failing its open requests when the engine's socket closes, the engine's
bridge and a RemoteLoop serving a fake engine over a socket pair, and the frontend child dying
with its parent."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")

from moelora_dist.engine.outputs import (AdapterCounts, EngineMetrics, RequestOutput,  # noqa: E402
                                         TokenLogprob)
from moelora_dist.engine.prompts import RequestError  # noqa: E402
from moelora_dist.engine.sampling_params import SamplingParams  # noqa: E402
from moelora_dist.serve.loop import (ModelNotFound, Overloaded, ShuttingDown,  # noqa: E402
                                     Snapshot, queue_sink)
from moelora_dist.serve.protocol import RequestInvalid  # noqa: E402
from moelora_dist.serve.wire import (FrameReader, RemoteError, encode,  # noqa: E402
                                     error_from_dict, error_to_dict, snapshot_to_dict)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _json(d):
    return json.loads(json.dumps(d, separators=(",", ":")))


def _metrics(**kw):
    return EngineMetrics(1, 2, 30, 40, 5, 64, 16, 1, 4, 0, 9, 7, kw.pop("adapters", {}), **kw)


def test_request_output_round_trips_with_logprobs_and_none_entries():
    out = RequestOutput("cmpl-1", [5, 6], "ab", [TokenLogprob(5, -0.5, [(5, -0.5), (9, -1.25)]),
                                               TokenLogprob(6, -0.0, [])],
                        [None, TokenLogprob(3, -2.0, [(3, -2.0)])], True, "length", 2, 2)
    assert RequestOutput.from_dict(_json(out.to_dict())) == out
    bare = RequestOutput("r", [])
    assert RequestOutput.from_dict(_json(bare.to_dict())) == bare


def test_sampling_params_round_trip_every_field():
    p = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05,
                       seed=(1 << 64) - 1, stop=("x", "yz"), stop_token_ids=(1, 2),
                       ignore_eos=True, logprobs=3, prompt_logprobs=0)
    assert SamplingParams.from_dict(_json(p.to_dict())) == p
    assert SamplingParams.from_dict(_json(SamplingParams().to_dict())) == SamplingParams()


def test_engine_metrics_and_snapshot_round_trip():
    from moelora_dist.serve.wire import snapshot_from_dict

    m = _metrics(adapters={"a1": AdapterCounts(1, 2, 3), "a2": AdapterCounts()},
                 decode_steps=4, step_seconds=0.25)
    assert EngineMetrics.from_dict(_json(m.to_dict())) == m
    snap = Snapshot(m, ("a1", "a2"), 3)
    assert snapshot_from_dict(_json(snapshot_to_dict(snap))) == snap


@pytest.mark.parametrize("exc,cls,param", [
    (ModelNotFound("no such model"), ModelNotFound, None),
    (Overloaded("64 wait"), Overloaded, None),
    (ShuttingDown("stopping"), ShuttingDown, None),
    (RequestInvalid("bad top_p", "top_p"), RequestInvalid, "top_p"),
    (RequestError("prompt too long"), RequestInvalid, None),  # any user error: 400
    (KeyError("slot"), RemoteError, None),  # a bug: 500 naming the class
])
def test_errors_round_trip_to_their_http_class(exc, cls, param):
    from moelora_dist.serve.app import STATUS, error_response

    got = error_from_dict(_json(error_to_dict(exc)))
    assert type(got) is cls and str(got) == str(exc)
    assert getattr(got, "param", None) == param
    status = next((s for k, s, _ in STATUS if isinstance(exc, k)), 500)
    r = error_response(got)
    assert r.status_code == status
    if cls is RemoteError:
        assert "(KeyError)" in json.loads(r.body)["error"]["message"]


def test_frames_split_at_any_byte_and_joined_in_one_read():
    msgs = [{"op": "abort", "request_id": f"r{i}"} for i in range(3)] + [{"op": "x", "s": "é"}]
    data = b"".join(encode(m) for m in msgs)
    for cut in range(1, len(data)):
        reader = FrameReader()
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == msgs
    reader = FrameReader()
    assert [m for b in data for m in reader.feed(bytes([b]))] == msgs
    assert FrameReader().feed(data) == msgs


def _recv_msgs(sock, reader, n, timeout=10):
    sock.settimeout(timeout)
    got = []
    while len(got) < n:
        got += reader.feed(sock.recv(1 << 16))
    return got


def test_remote_loop_fails_open_requests_when_the_socket_closes():
    from moelora_dist.serve.remote import RemoteLoop

    ours, theirs = socket.socketpair()
    theirs.sendall(encode(snapshot_to_dict(Snapshot(_metrics(), ("a1",), 0))))
    loop = RemoteLoop(ours)
    assert loop.snapshot.adapters == ("a1",) and loop.alive

    async def main():
        fatal = asyncio.Event()
        loop.on_fatal = fatal.set
        loop.attach(asyncio.get_running_loop())
        q: asyncio.Queue = asyncio.Queue()
        admitted = loop.add("r1", [1, 2], SamplingParams(), None, queue_sink(q))
        waiting = loop.add("r2", [3], SamplingParams(), "a1", queue_sink(q))
        reader = FrameReader()
        adds = await asyncio.to_thread(_recv_msgs, theirs, reader, 2)
        assert [m["request_id"] for m in adds] == ["r1", "r2"]
        assert SamplingParams.from_dict(adds[1]["params"]) == SamplingParams()
        theirs.sendall(encode({"op": "reply", "id": adds[0]["id"], "ok": True}) + encode(
            {"op": "outputs", "outputs": [RequestOutput("r1", [7]).to_dict()]}))
        await asyncio.wrap_future(admitted)
        assert (await asyncio.wait_for(q.get(), 10)).new_token_ids == [7]
        theirs.close()
        await asyncio.wait_for(fatal.wait(), 10)
        failed = await asyncio.wait_for(q.get(), 10)
        assert isinstance(failed, RemoteError) and failed.kind == "EngineGone"
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(asyncio.wrap_future(waiting), 10)
        with pytest.raises(ShuttingDown):  # later requests are refused at once
            await asyncio.wrap_future(loop.add("r3", [1], SamplingParams(), None,
                                               queue_sink(q)))

    asyncio.run(main())
    assert not loop.alive
    ours.close()


class _Engine:
    """Each step gives every running request one token (its count so far); a request ends at
    its ``max_tokens``. Adapter "a1" can be loaded and unloaded."""

    def __init__(self):
        self.adapter_names = []
        self.adapters = type("A", (), dict(servable=lambda s, a: a in self.adapter_names))()
        self.scheduler = type("S", (), dict(waiting=[]))()
        self.after_launch = None
        self.running = {}

    def has_unfinished(self):
        return bool(self.running)

    def add_request(self, rid, ids, params, adapter):
        self.running[rid] = [0, params.max_tokens]

    def abort(self, rid):
        self.running.pop(rid, None)

    def add_adapter(self, name, path):
        if path == "boom":
            raise KeyError(path)
        self.adapter_names.append(name)

    def remove_adapter(self, name):
        self.adapter_names.remove(name)

    def step(self):
        self.after_launch()
        outs = []
        for rid, st in list(self.running.items()):
            st[0] += 1
            done = st[0] == st[1]
            if done:
                del self.running[rid]
            outs.append(RequestOutput(rid, [st[0]], finished=done,
                                      finish_reason="length" if done else None))
        return outs

    def metrics(self):
        return _metrics(adapters={n: AdapterCounts() for n in self.adapter_names})

    def keepalive(self):
        pass

    def shutdown(self):
        pass


def _serve_over_socket_pair(engine):
    """``engine`` behind an EngineLoop and the engine's bridge on one end of a socket pair, a
    RemoteLoop on the other: ``(engine loop, remote loop, bridge's socket, remote's socket)``."""
    from moelora_dist.serve.bridge import EngineBridge
    from moelora_dist.serve.loop import EngineLoop
    from moelora_dist.serve.remote import RemoteLoop

    engine_loop = EngineLoop(engine, max_waiting=4, heartbeat_s=0.05)
    ours, theirs = socket.socketpair()
    bridge = EngineBridge(engine_loop, ours)
    engine_loop.start()
    bridge.start()
    return engine_loop, RemoteLoop(theirs), ours, theirs


def test_bridge_and_remote_loop_serve_an_engine_over_a_socket_pair():
    """Streams, admission limits, adapter load / unload with the snapshot following, and an
    engine-side bug as a 500-class error, through the engine's bridge and the frontend's loop."""
    engine_loop, loop, ours, theirs = _serve_over_socket_pair(_Engine())

    async def main():
        loop.attach(asyncio.get_running_loop())
        wait = asyncio.wrap_future
        await wait(loop.load_adapter("a1", "/x"))
        assert loop.snapshot.adapters == ("a1",)  # the answer came after its snapshot
        with pytest.raises(RemoteError, match="boom"):
            await wait(loop.load_adapter("a2", "boom"))
        queues = [asyncio.Queue() for _ in range(3)]
        await asyncio.gather(*(wait(loop.add(f"r{i}", [1], SamplingParams(max_tokens=5),
                                             "a1", queue_sink(q)))
                               for i, q in enumerate(queues)))
        for q in queues:
            got = [await asyncio.wait_for(q.get(), 10) for _ in range(5)]
            assert [o.new_token_ids[0] for o in got] == [1, 2, 3, 4, 5] and got[-1].finished
        with pytest.raises(ModelNotFound):
            await wait(loop.add("r9", [1], SamplingParams(), "nope", queue_sink(queues[0])))
        await wait(loop.unload_adapter("a1"))
        assert loop.snapshot.adapters == ()
        with pytest.raises(ModelNotFound):
            await wait(loop.unload_adapter("a1"))
        loop.refuse_new()  # (as from a signal handler: sent on the loop's next turn)
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDown):
            await wait(loop.add("r10", [1], SamplingParams(), None, queue_sink(queues[0])))

    asyncio.run(main())
    loop.stop(0.0)
    deadline = time.monotonic() + 10
    while engine_loop.thread.is_alive():
        assert time.monotonic() < deadline, "the engine loop did not stop"
        time.sleep(0.05)
    ours.close()
    theirs.close()


def _state(pid: int) -> str | None:
    """The process's state letter, None once it is gone (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return None
    return None if state in ("Z", "X") else state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_frontend_child_dies_with_its_parent():
    """A parent that starts the frontend child and is SIGKILLed: the kernel kills the child
    too, within a couple of seconds. The child waits for its settings on a pipe this test
    keeps open, so nothing but the parent-death signal ends it."""
    parent = textwrap.dedent("""
        import os, socket, subprocess, sys, time
        a, b = socket.socketpair()
        child = subprocess.Popen([sys.executable, "-m", "moelora_dist.serve.frontend",
                                  str(b.fileno()), str(os.getpid())], pass_fds=(b.fileno(),),
                                 stdin=int(sys.argv[1]))
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    settings_r, settings_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", parent, str(settings_r)],
                            stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True,
                            pass_fds=(settings_r,))
    os.close(settings_r)
    try:
        child = int(proc.stdout.readline())
        deadline = time.monotonic() + 10
        while _state(child) is not None and open(f"/proc/{child}/cmdline").read().find(
                "frontend") < 0:
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        time.sleep(0.5)  # past its prctl call (the first thing it does)
        assert _state(child) is not None
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 3
        while _state(child) is not None:
            assert time.monotonic() < deadline, "the frontend outlived its parent"
            time.sleep(0.05)
    finally:
        os.close(settings_w)
        proc.kill()
        proc.wait(timeout=10)


def test_an_engine_failure_fails_open_requests_and_kills_health():
    """The engine loop fails mid-request: the request gets the error (a 500-class one), the
    frontend's loop is no longer alive (``/health`` 503) and asks its server to exit."""
    class Broken(_Engine):
        def step(self):
            raise RuntimeError("device lost")

    engine_loop, loop, ours, theirs = _serve_over_socket_pair(Broken())

    async def main():
        fatal = asyncio.Event()
        loop.on_fatal = fatal.set
        loop.attach(asyncio.get_running_loop())
        q: asyncio.Queue = asyncio.Queue()
        await asyncio.wrap_future(loop.add("r1", [1], SamplingParams(), None, queue_sink(q)))
        failed = await asyncio.wait_for(q.get(), 10)
        assert isinstance(failed, RemoteError) and failed.kind == "RuntimeError"
        await asyncio.wait_for(fatal.wait(), 10)

    asyncio.run(main())
    assert not loop.alive and not engine_loop.alive
    ours.close()
    theirs.close()
