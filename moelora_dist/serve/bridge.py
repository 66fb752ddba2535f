"""The engine process's end of the HTTP frontend's socket (``--frontend process``).

    proc, sock = spawn_frontend(config, facts)     # python -m moelora_dist.serve.frontend
    bridge = EngineBridge(loop, sock)
    bridge.start()                                 # the first snapshot, then the reader thread
    bridge.wait_ready(proc, timeout_s=120)         # uvicorn listens (or the child exited)

A reader thread blocks on the socket (with the GIL released) and turns each frame
(:mod:`.wire`) into an :class:`~.loop.EngineLoop` call. Every request's sink is on one
:class:`SocketChannel`, so the engine loop's hand-over of a step (``put_all``) is one
``outputs`` frame. Frames are written by whichever thread has them (the engine thread: outputs,
answers, snapshots; the reader thread: refusals at once) under one lock, so they never
interleave; the latest snapshot goes in the same write as the next frame when it changed, or
alone after commands that answer nothing (an abort frees pages).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

from moelora_dist.engine.outputs import RequestOutput
from moelora_dist.engine.sampling_params import SamplingParams
from moelora_dist.errors import MoeloraError
from moelora_dist.serve.loop import Sink
from moelora_dist.serve.security import API_KEY_ENV
from moelora_dist.serve.wire import FrameReader, encode, error_to_dict, snapshot_to_dict

log = logging.getLogger(__name__)


def spawn_frontend(config, facts: dict) -> tuple[subprocess.Popen, socket.socket]:
    """Start the frontend child connected by a socket pair; its settings go on stdin as JSON
    (the API key in its environment: never on a command line, which ``ps`` shows). The child
    gets a process group of its own, so a terminal's SIGINT reaches it once, through us."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    if config.api_key:
        env[API_KEY_ENV] = config.api_key
    settings = {"config": {**dataclasses.asdict(config), "api_key": None}, **facts}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "moelora_dist.serve.frontend",
                                 str(theirs.fileno()), str(os.getpid())],
                                pass_fds=(theirs.fileno(),), stdin=subprocess.PIPE, env=env,
                                process_group=0)
    finally:
        theirs.close()
    proc.stdin.write(json.dumps(settings).encode())
    proc.stdin.close()
    return proc, ours


class SocketChannel:
    """The channel of every request of the frontend: a step's items become one frame."""

    def __init__(self, bridge: "EngineBridge"):
        self.bridge = bridge

    def put_all(self, items) -> None:
        outputs, failed, exc = [], [], None
        for sink, item in items:
            if isinstance(item, RequestOutput):
                outputs.append(item.to_dict())
            else:
                failed.append(sink.target)
                exc = item
        frames = []
        if outputs:
            frames.append({"op": "outputs", "outputs": outputs})
        if failed:
            frames.append({"op": "fail", "error": error_to_dict(exc), "request_ids": failed})
        self.bridge.send(*frames)


class EngineBridge:
    """Serves ``loop`` to the frontend on ``sock`` (module docstring)."""

    def __init__(self, loop, sock: socket.socket):
        self.loop, self.sock = loop, sock
        self.channel = SocketChannel(self)
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._sent_snapshot = None
        self._thread = threading.Thread(target=self._read, name="frontend-reader", daemon=True)
        loop.on_commands = self.send  # an abort answers nothing, its snapshot still goes
        loop.on_fatal = self._engine_failed

    def start(self) -> None:
        self.send()
        self._thread.start()

    def wait_ready(self, proc: subprocess.Popen, timeout_s: float) -> bool:
        """Whether the frontend listens; False when it exited first or took ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
        return True

    def send(self, *frames: dict) -> None:
        """Write ``frames`` in one piece, led by the snapshot when it changed since the last
        write. A frontend that is gone is not an error here: the leader sees its exit."""
        with self._lock:
            snap = self.loop.snapshot
            data = b"".join(map(encode, frames))
            if snap is not self._sent_snapshot:
                data = encode(snapshot_to_dict(snap)) + data
                self._sent_snapshot = snap
            if not data:
                return
            try:
                self.sock.sendall(data)
            except OSError as exc:
                log.debug("the frontend's socket is closed: %s", exc)

    def _reply(self, msg_id: int, fut) -> None:
        exc = fut.exception()
        if exc is None:
            self.send({"op": "reply", "id": msg_id, "ok": True})
            return
        if not isinstance(exc, MoeloraError):
            log.error("internal error", exc_info=exc)
        self.send({"op": "reply", "id": msg_id, "ok": False, "error": error_to_dict(exc)})

    def _answer(self, msg_id: int, fut) -> None:
        fut.add_done_callback(lambda f: self._reply(msg_id, f))

    def _handle(self, msg: dict) -> None:
        op, loop = msg["op"], self.loop
        if op == "add":
            rid = msg["request_id"]
            try:
                params = SamplingParams.from_dict(msg["params"])
            except MoeloraError as exc:
                self.send({"op": "reply", "id": msg["id"], "ok": False,
                           "error": error_to_dict(exc)})
                return
            self._answer(msg["id"], loop.add(rid, msg["prompt_ids"], params, msg["adapter"],
                                             Sink(self.channel, rid)))
        elif op == "abort":
            loop.abort(msg["request_id"])
        elif op == "load_adapter":
            self._answer(msg["id"], loop.load_adapter(msg["name"], msg["path"]))
        elif op == "unload_adapter":
            self._answer(msg["id"], loop.unload_adapter(msg["name"]))
        elif op == "refuse_new":
            loop.refuse_new()
        elif op == "stop":
            loop.stop(msg["deadline_s"])
        elif op == "ready":
            self.ready.set()
        else:
            raise ValueError(f"unknown message {op!r} from the frontend")

    def _read(self) -> None:
        reader = FrameReader()
        try:
            while data := self.sock.recv(1 << 16):
                for msg in reader.feed(data):
                    self._handle(msg)
        except OSError as exc:
            log.debug("the frontend's socket is closed: %s", exc)
        except Exception:  # a bug on either side: the frontend sees its socket close and exits
            log.exception("the frontend's connection failed")
            self.sock.shutdown(socket.SHUT_RDWR)

    def _engine_failed(self) -> None:
        self.send({"op": "dead", "error": error_to_dict(self.loop.error)})
