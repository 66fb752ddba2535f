"""The HTTP frontend process: uvicorn and the app (:mod:`.app`), with a :class:`RemoteLoop` on
the socket to the engine process in place of the :class:`~.loop.EngineLoop`.

    loop = RemoteLoop(sock)          # blocks for the engine's first snapshot
    loop.attach(asyncio_loop)        # reads the socket on the event loop from now on
    fut = loop.add("r1", ids, params, "math", queue_sink(q))   # as EngineLoop.add

Its settings come as JSON on stdin, the API key in ``$MOELORA_API_KEY``; it builds its own
tokenizer from the model directory. The socket is read on uvicorn's event loop
(``add_reader``), not by a thread: a frame's outputs reach their requests' queues where the
handlers run, with no second thread taking turns with the event loop over the GIL. Every
write is a small frame on a blocking socket whose reader (the engine's bridge thread) never
waits for anything but the socket, made on the event loop's thread (a signal handler's
``refuse_new`` is deferred to the loop: run inside another write, it would cut that frame).
When the socket closes under it, or the engine reports its failure, every open request fails
(500, or an error that ends its stream), ``/health`` answers 503, and the process exits 1;
after a signal it drains as uvicorn does, tells the engine to stop, and exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import os
import socket
import sys

from moelora_dist.engine.outputs import RequestOutput
from moelora_dist.serve.loop import ShuttingDown
from moelora_dist.serve.server import ServeConfig, _Server, run_http
from moelora_dist.serve.wire import (FrameReader, RemoteError, encode, error_from_dict,
                                     snapshot_from_dict)

log = logging.getLogger(__name__)


class RemoteLoop:
    """The engine loop's surface for the app, over the socket to the engine process."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.error: BaseException | None = None
        self.on_fatal = None  # called (on the event loop) after a failure
        self.snapshot = None
        self._reader = FrameReader()
        self._ids = itertools.count()
        self._sinks: dict[str, object] = {}
        self._replies: dict[int, tuple[concurrent.futures.Future, str | None]] = {}
        self._aio_loop = None
        while self.snapshot is None:  # the bridge writes one first
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the engine process closed the connection at start")
            for msg in self._reader.feed(data):
                self._handle(msg)

    @property
    def alive(self) -> bool:
        return self.error is None

    def attach(self, aio_loop) -> None:
        """Read the socket on ``aio_loop`` (uvicorn's) from now on."""
        self._aio_loop = aio_loop
        aio_loop.add_reader(self.sock.fileno(), self._readable)

    def ready(self) -> None:
        self._send({"op": "ready"})

    def add(self, request_id: str, prompt_ids: list[int], params, adapter: str | None,
            sink) -> concurrent.futures.Future:
        """Ask the engine to admit a request; the engine decides (``--max-waiting``)."""
        self._sinks[request_id] = sink
        return self._ask({"op": "add", "request_id": request_id, "prompt_ids": prompt_ids,
                          "params": params.to_dict(), "adapter": adapter}, request_id)

    def abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is not None:
            self._send({"op": "abort", "request_id": request_id})

    def load_adapter(self, name: str, path: str) -> concurrent.futures.Future:
        return self._ask({"op": "load_adapter", "name": name, "path": path})

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        return self._ask({"op": "unload_adapter", "name": name})

    def refuse_new(self) -> None:
        """From a signal handler: sent by the event loop, never inside another write."""
        self._aio_loop.call_soon_threadsafe(self._send, {"op": "refuse_new"})

    def stop(self, deadline_s: float) -> None:
        self._send({"op": "stop", "deadline_s": deadline_s})

    def _ask(self, msg: dict, request_id: str | None = None) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.error is not None:
            self._sinks.pop(request_id, None)
            fut.set_exception(ShuttingDown("the engine has stopped"))
            return fut
        msg["id"] = msg_id = next(self._ids)
        self._replies[msg_id] = (fut, request_id)
        self._send(msg)
        return fut

    def _send(self, msg: dict) -> None:
        if self.error is not None:
            return
        try:
            self.sock.sendall(encode(msg))
        except OSError as exc:  # the engine is gone; the reader sees it too
            log.debug("the engine's socket is closed: %s", exc)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._fail(RemoteError("EngineGone", "the engine process closed its connection"))
            return
        for msg in self._reader.feed(data):
            self._handle(msg)

    def _handle(self, msg: dict) -> None:
        op = msg["op"]
        if op == "outputs":
            batches: dict[object, list] = {}
            for d in msg["outputs"]:
                sink = self._sinks.get(d["request_id"])
                if sink is None:  # aborted here while the engine ran its step
                    continue
                if d["finished"]:
                    del self._sinks[d["request_id"]]
                batches.setdefault(sink.channel, []).append((sink, RequestOutput.from_dict(d)))
            for channel, items in batches.items():
                channel.put_all(items)
        elif op == "snapshot":
            self.snapshot = snapshot_from_dict(msg)
        elif op == "reply":
            fut, request_id = self._replies.pop(msg["id"])
            if msg["ok"]:
                fut.set_result(None)
            else:
                self._sinks.pop(request_id, None)
                fut.set_exception(error_from_dict(msg["error"]))
        elif op == "fail":
            self._put_error(msg["request_ids"], error_from_dict(msg["error"]))
        elif op == "dead":
            self._fail(error_from_dict(msg["error"]))
        else:
            raise ValueError(f"unknown message {op!r} from the engine")

    def _put_error(self, request_ids, exc: BaseException) -> None:
        batches: dict[object, list] = {}
        for rid in request_ids:
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                batches.setdefault(sink.channel, []).append((sink, exc))
        for channel, items in batches.items():
            channel.put_all(items)

    def _fail(self, exc: BaseException) -> None:
        """The engine is gone: fail every open request and answer, then let the server exit."""
        if self.error is not None:
            return
        log.error("the engine failed: %s", exc)
        self.error = exc
        if self._aio_loop is not None:
            self._aio_loop.remove_reader(self.sock.fileno())
        self._put_error(list(self._sinks), exc)
        replies, self._replies = self._replies, {}
        for fut, _ in replies.values():
            fut.set_exception(ShuttingDown("the engine has stopped"))
        if self.on_fatal is not None:
            self.on_fatal()


class FrontendServer(_Server):
    """Reads the engine's socket on uvicorn's loop, and says ``ready`` once it listens."""

    async def startup(self, sockets=None):
        self.engine_loop.attach(asyncio.get_running_loop())
        await super().startup(sockets)
        self.engine_loop.ready()


def run_frontend(fd: int) -> int:
    """Serve HTTP for the engine on socket ``fd``; the exit code (module docstring)."""
    from moelora_dist.logs import setup_logging
    from moelora_dist.serve.app import ServerState
    from moelora_dist.serve.security import API_KEY_ENV

    setup_logging()
    settings = json.load(sys.stdin)
    config = ServeConfig(**{**settings.pop("config"), "api_key": os.environ.get(API_KEY_ENV)})
    model_dir = settings.pop("model_dir")
    codec = None
    if model_dir is not None:
        from moelora_dist.engine.text import TextCodec

        codec = TextCodec.from_model_dir(model_dir)
    loop = RemoteLoop(socket.socket(fileno=fd))
    state = ServerState(loop, codec, **settings, api_key=config.api_key,
                        enable_lora_loading=config.enable_lora_loading,
                        adapter_root=config.adapter_root)
    run_http(state, config, FrontendServer)
    if loop.error is not None:
        return 1
    loop.stop(deadline_s=0.0)
    return 0
