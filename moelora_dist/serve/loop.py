"""The engine's own thread: every engine call of the server runs here, in order, between steps.

    loop = EngineLoop(engine, max_waiting=256)
    loop.start()
    sink = queue_sink(queue)                             # where one request's outputs go
    await asyncio.wrap_future(loop.add("r1", ids, params, "math", sink))  # raises if refused
    ... queue.get() -> RequestOutput (or an exception) ...
    loop.abort("r1")                                     # client gone: pages freed at once
    await asyncio.wrap_future(loop.load_adapter("x", path))
    loop.stop(deadline_s=30)                             # finish or cancel, then end followers

Why a thread and not the event loop: a step holds the CPU for milliseconds (host work) and
then waits for the device; on the event loop that would stall every connection. Why one
thread: the engine is not thread-safe, and one owner makes every decision (admission, abort,
adapter load and unload) happen between two steps, never inside one. The HTTP side never
touches the engine: it queues commands (:meth:`add`, :meth:`abort`, :meth:`load_adapter`,
...) and receives outputs through each request's :class:`Sink`. Sinks on one channel get a
whole step's outputs in one ``channel.put_all`` call: for an event loop in this process
(:class:`EventLoopChannel`, ``--frontend thread``) one ``call_soon_threadsafe``; for the
HTTP frontend in its own process (``serve/bridge.py``, the default) one frame on its socket.
Commands' futures are answered after the snapshot is refreshed, so a client that sees a
load's answer also sees the adapter in ``/v1/models``.

Outputs are handed over one step late, while the device works: the outputs of step N are
held until step N+1's forward is queued (``Engine.after_launch``), then delivered while the
engine thread waits for step N+1's tokens with the GIL released. Delivered at once, the event
loop's work on them (one server-sent event per request) ran at the same moment as the engine
thread's host work for step N+1, and the two took turns with the GIL: on one H200 at 64 streams
the server's steps took 30.0 ms against the offline engine's 25.1 ms, 17% of the throughput
(``benchmarks/serve``). Each token reaches its client later by the host time of one step (a
few ms), never by a whole step; when no step follows (the engine ran out of work, or a step had
nothing to run) the held outputs go at once. (The handover alone took 1.1 ms of the 4.9 ms off;
the HTTP side in a process of its own removes the sharing of the GIL altogether.)

Admission is bounded: :meth:`add` refuses a request with :class:`Overloaded` when
``max_waiting`` requests already wait (those queued here but not yet admitted included), so
neither this queue nor the scheduler's grows without bound. A leader with followers (TP > 1)
sends them a keep-alive every ``heartbeat_s`` seconds while idle (:meth:`Engine.keepalive`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass

from moelora_dist.errors import MoeloraError

log = logging.getLogger(__name__)


class Overloaded(MoeloraError):
    """Too many requests wait already; the client should retry later (HTTP 429)."""


class ShuttingDown(MoeloraError):
    """The server is stopping and takes no new request (HTTP 503)."""


class ModelNotFound(MoeloraError):
    """A ``model`` that is neither the base model nor a loaded adapter (HTTP 404)."""


class Sink:
    """Where one request's outputs (or the exception that ended it) go: ``target`` (an
    asyncio queue, a request id) through ``channel``, which takes every item of a step that is
    on it in one ``channel.put_all([(sink, item), ...])`` (module docstring)."""

    __slots__ = ("channel", "target")

    def __init__(self, channel, target):
        self.channel, self.target = channel, target


@dataclass(frozen=True)
class EventLoopChannel:
    """Puts items into asyncio queues of one event loop: one callback per step. Equal for equal
    loops, so the sinks of every request on a loop share one batch."""

    aio_loop: object

    def put_all(self, items) -> None:
        self.aio_loop.call_soon_threadsafe(_put_all, items)


def queue_sink(aio_queue) -> Sink:
    """A sink into ``aio_queue`` of the running event loop."""
    return Sink(EventLoopChannel(asyncio.get_running_loop()), aio_queue)


@dataclass
class Snapshot:
    """What the HTTP side may read without asking the engine thread (refreshed each step)."""

    metrics: object
    adapters: tuple[str, ...]
    waiting: int


class EngineLoop:
    """Owns ``engine`` on one thread (module docstring)."""

    def __init__(self, engine, max_waiting: int = 256, heartbeat_s: float = 5.0):
        self.engine, self.max_waiting, self.heartbeat_s = engine, max_waiting, heartbeat_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._held: list = []  # the last step's outputs, delivered during the next forward
        self._pending = 0  # adds queued but not yet run (guarded by _lock)
        self._lock = threading.Lock()
        self._stop_at: float | None = None
        self._accepting = True
        self.error: BaseException | None = None
        self.on_fatal = None  # called (from the engine thread) after a failure
        self.on_commands = None  # called (engine thread) after queued commands ran
        self.snapshot = self._snap()
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- called from any thread -----------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        """Whether the engine still serves (``/health``)."""
        return self.error is None and self.thread.is_alive()

    def _call(self, fn) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between two steps; its result or exception
        comes back through the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.error is not None or not self.thread.is_alive() and self.thread.ident:
            fut.set_exception(ShuttingDown("the engine has stopped"))
            return fut
        self._commands.put((fn, fut))
        return fut

    def add(self, request_id: str, prompt_ids: list[int], params, adapter: str | None,
            sink: Sink) -> concurrent.futures.Future:
        """Queue a request (checked on the engine thread: adapter, lengths, sampling)."""
        with self._lock:
            if not self._accepting:
                fut = concurrent.futures.Future()
                fut.set_exception(ShuttingDown("the server is shutting down; no new requests"))
                return fut
            if self._pending + self.snapshot.waiting >= self.max_waiting:
                fut = concurrent.futures.Future()
                fut.set_exception(Overloaded(
                    f"{self.max_waiting} requests are waiting already (--max-waiting); retry "
                    "later"))
                return fut
            self._pending += 1
        return self._call(lambda engine: self._admit(engine, request_id, prompt_ids, params,
                                                     adapter, sink))

    def abort(self, request_id: str) -> None:
        """Cancel a request (a client that went away): its pages are free after this call
        runs, before the next step."""
        self._call(lambda engine: self._abort(engine, request_id))

    def load_adapter(self, name: str, path: str) -> concurrent.futures.Future:
        """Load the adapter at ``path`` as model ``name`` (checked against every layer before
        it is registered)."""
        return self._call(lambda engine: engine.add_adapter(name, path))

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        """Unload adapter ``name``: new requests for it are refused at once, requests in
        flight on it finish first."""
        return self._call(lambda engine: _remove_adapter(engine, name))

    def refuse_new(self) -> None:
        """From now on :meth:`add` answers :class:`ShuttingDown` (a signal arrived). Takes no
        lock: it runs in signal handlers, which may interrupt :meth:`add` holding it."""
        self._accepting = False

    def stop(self, deadline_s: float) -> None:
        """Refuse new requests; let running ones finish for ``deadline_s`` seconds, then
        cancel the rest (their clients get ``finish_reason: "abort"``); end the followers'
        loop and this thread. Blocks until the thread ended."""
        with self._lock:
            self._accepting = False
        self._stop_at = time.monotonic() + deadline_s
        self._commands.put((None, None))  # wake an idle loop
        if self.thread.ident is not None:
            self.thread.join()

    # -- the engine thread ----------------------------------------------------------------------

    def _snap(self) -> Snapshot:
        e = self.engine
        return Snapshot(e.metrics(), tuple(e.adapter_names), len(e.scheduler.waiting))

    def _admit(self, engine, request_id, prompt_ids, params, adapter, sink) -> None:
        with self._lock:
            self._pending -= 1
        if adapter is not None and not engine.adapters.servable(adapter):
            raise ModelNotFound(f"the model {adapter!r} does not exist (being unloaded or never "
                                f"loaded); loaded: {sorted(engine.adapter_names)}")
        if len(engine.scheduler.waiting) >= self.max_waiting:
            raise Overloaded(f"{self.max_waiting} requests are waiting already (--max-waiting); "
                             "retry later")
        engine.add_request(request_id, prompt_ids, params, adapter)
        self._sinks[request_id] = sink

    def _abort(self, engine, request_id) -> None:
        if self._sinks.pop(request_id, None) is not None:
            engine.abort(request_id)

    def _drain(self, timeout: float | None) -> bool:
        """Run the queued commands; wait up to ``timeout`` for the first (None: don't wait),
        refresh the snapshot, then answer the commands' futures. False when a stop was asked."""
        try:
            item = self._commands.get(timeout=timeout) if timeout else \
                self._commands.get_nowait()
        except queue.Empty:
            return True
        answers = []
        go_on = True
        while True:
            fn, fut = item
            if fn is None:
                go_on = False
                break
            if fut.set_running_or_notify_cancel():
                try:
                    answers.append((fut, fn(self.engine), None))
                except BaseException as exc:  # the caller turns it into an HTTP error
                    answers.append((fut, None, exc))
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                break
        self.snapshot = self._snap()
        for fut, result, exc in answers:
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)
        if self.on_commands is not None:
            self.on_commands()
        return go_on

    def _deliver(self, outputs) -> None:
        """Hand each output to its request's sink: one ``put_all`` per channel."""
        batches: dict[object, list] = {}
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
            batches.setdefault(sink.channel, []).append((sink, out))
        for channel, items in batches.items():
            channel.put_all(items)

    def _release(self) -> None:
        """Deliver the held outputs (``Engine.after_launch``: the next forward is queued)."""
        held, self._held = self._held, []
        if held:
            self._deliver(held)

    def _run(self) -> None:
        engine = self.engine
        engine.after_launch = self._release
        idle_since = time.monotonic()
        stopping = False
        try:
            while True:
                busy = engine.has_unfinished()
                if not self._drain(None if busy else (0.05 if stopping else self.heartbeat_s)):
                    stopping = True
                if stopping and (not engine.has_unfinished()
                                 or time.monotonic() >= self._stop_at):
                    self._release()
                    self._cancel_all(engine)
                    break
                if engine.has_unfinished():
                    outputs = engine.step()
                    self._release()  # a step that ran no forward did not hand them over
                    self.snapshot = self._snap()  # before a client can see the outputs
                    if engine.has_unfinished():
                        self._held = outputs  # delivered while the next forward runs
                    else:
                        self._deliver(outputs)
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= self.heartbeat_s:
                    engine.keepalive()
                    idle_since = time.monotonic()
        except BaseException as exc:  # a bug: fail every request, and let the server exit
            log.exception("the engine loop failed; the server stops")
            self.error = exc
            self._fail_all(exc)
            if self.on_fatal is not None:
                self.on_fatal()
        finally:
            engine.after_launch = None
            self._drain_refused()
            engine.shutdown()

    def _cancel_all(self, engine) -> None:
        from moelora_dist.engine.outputs import RequestOutput

        outs = []
        for rid in list(self._sinks):
            engine.abort(rid)
            outs.append(RequestOutput(rid, [], finished=True, finish_reason="abort"))
        engine.drain()  # a step in flight ends before the server does
        self._deliver(outs)

    def _fail_all(self, exc: BaseException) -> None:
        batches: dict[object, list] = {}
        for sink in self._sinks.values():
            batches.setdefault(sink.channel, []).append((sink, exc))
        self._sinks.clear()
        for channel, items in batches.items():
            channel.put_all(items)

    def _drain_refused(self) -> None:
        """Commands that arrive after the end get an error, never silence."""
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(ShuttingDown("the server is shutting down"))


def _put_all(items) -> None:
    for sink, item in items:
        sink.target.put_nowait(item)


def _remove_adapter(engine, name: str) -> None:
    if name not in engine.adapter_names:
        raise ModelNotFound(f"no adapter named {name!r} is loaded; loaded: "
                            f"{engine.adapter_names}")
    engine.remove_adapter(name)  # requests in flight on it finish first
