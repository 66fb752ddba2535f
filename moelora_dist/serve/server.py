"""Run a built engine as the HTTP server (the leader rank) or as a follower (every other rank).

    code = serve(engine, ServeConfig(host="127.0.0.1", port=8000), served_name="base", ...)

The leader (TP rank 0) runs the engine loop thread (:mod:`.loop`); the other ranks of the TP
group run :meth:`Engine.follow` until the leader's stop. HTTP (uvicorn and the app) runs, with
``frontend="process"`` (the default), in a child process of the leader
(:mod:`.frontend`, fed through a socket by :mod:`.bridge`), so that its work per token never
takes the GIL from the engine's; with ``frontend="thread"`` on the leader's main thread (for
debugging, and the benchmark's comparison). The leader
shares the GIL between the engine thread and, with ``frontend="thread"``, the event loop:
``switch_interval_s`` bounds how long the engine thread, back from a device wait, may wait for
it (Python's default: 5 ms); ``http_impl`` / ``event_loop`` choose uvicorn's HTTP parser and
event loop (httptools and uvloop, or the pure-Python h11 and asyncio's loop).

Shutdown on SIGTERM or SIGINT: the leader forwards the signal to the frontend (and refuses new
requests at once); uvicorn's handlers close the listening socket (no new connection), new
requests on open connections get 503, requests in flight keep streaming until they finish or
``shutdown_timeout`` seconds have passed, then the rest are cancelled (``finish_reason:
"abort"``); the frontend exits 0, the loop sends the followers their stop, and the process
exits 0. A frontend that dies ends the server with 1; an engine that fails tells the frontend
(503 on /health, 500 to open requests), which exits, and the server exits 1. Followers ignore
the two signals themselves (the launcher sends them to every rank): they end when the leader's
stop arrives, so no rank leaves a collective half done. A rank that dies ends the whole job
non-zero (the launcher's guarantee).
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
from dataclasses import dataclass

import uvicorn

from moelora_dist.errors import OptionError

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """The server's own settings (the engine's are :class:`~moelora_dist.engine.config.EngineConfig`).

    host/port: where to listen (127.0.0.1 unless told: not reachable from other machines).
    api_key: required as ``Authorization: Bearer`` on every route but /health (None: open).
    max_waiting: requests that may wait for admission before new ones get 429.
    enable_lora_loading / adapter_root: run-time adapter loads, only from under the root.
    shutdown_timeout: seconds requests in flight may take to finish after SIGTERM/SIGINT.
    heartbeat_s: keep-alive period of an idle leader towards its followers.
    log_level: uvicorn's access and error log level.
    switch_interval_s: the interpreter's GIL switch interval (None: Python's own, 5 ms).
    http_impl / event_loop: uvicorn's HTTP implementation ("auto", "h11", "httptools") and
    event loop ("auto", "asyncio", "uvloop"); "auto" takes httptools / uvloop when installed.
    frontend: "process" (HTTP in a child process) or "thread" (on the leader's main thread).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_waiting: int = 256
    enable_lora_loading: bool = False
    adapter_root: str | None = None
    shutdown_timeout: float = 20.0
    heartbeat_s: float = 5.0
    log_level: str = "warning"
    switch_interval_s: float | None = None
    http_impl: str = "auto"
    event_loop: str = "auto"
    frontend: str = "process"


READY_S = 120.0  # the frontend's start: imports, the tokenizer, binding the port


# option -> (the fast choice and its package, the pure-Python fallback)
_UVICORN_CHOICES = {"http_impl": ("httptools", "h11"), "event_loop": ("uvloop", "asyncio")}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def uvicorn_choices(config: ServeConfig) -> dict[str, str]:
    """The HTTP implementation and event loop uvicorn will run, ``{"http_impl", "event_loop"}``.

    "auto" resolves as uvicorn resolves it (the fast package when it imports, else the
    fallback), so the start-up log names what really runs; a fast one asked for by name that
    does not import is an OptionError naming the package and the fix.
    """
    out = {}
    for field, (fast, fallback) in _UVICORN_CHOICES.items():
        choice = getattr(config, field)
        if choice == "auto":
            choice = fast if _importable(fast) else fallback
        elif choice == fast and not _importable(fast):
            raise OptionError(f"--{field.replace('_', '-')} {fast}: the {fast} package is not "
                              f"installed; pip install {fast}")
        out[field] = choice
    return out


def uvicorn_config(app, config: ServeConfig) -> uvicorn.Config:
    """uvicorn's config for ``app`` under ``config``; logs the HTTP implementation and loop."""
    choices = uvicorn_choices(config)
    log.info("uvicorn: HTTP implementation %s, event loop %s", choices["http_impl"],
             choices["event_loop"])
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                          timeout_graceful_shutdown=config.shutdown_timeout, lifespan="off",
                          http=choices["http_impl"], loop=choices["event_loop"])


def apply_switch_interval(config: ServeConfig) -> None:
    """Set the GIL switch interval of ``config`` (None: leave the interpreter's), and log it."""
    if config.switch_interval_s is None:
        return
    sys.setswitchinterval(config.switch_interval_s)
    log.info("GIL switch interval %g ms (Python's default 5 ms)",
             sys.getswitchinterval() * 1e3)


def serve(engine, config: ServeConfig, *, served_name: str, model_root: str,
          adapter_sources: dict[str, str], model_dir: str | None = None) -> int:
    """Serve until a signal (leader) or the leader's stop (followers); returns the exit code.
    ``model_dir``: where the frontend process reads the tokenizer from (None: no text)."""
    if not engine.is_leader:
        _ignore_signals()
        engine.follow()
        return 0
    from moelora_dist.serve.loop import EngineLoop

    loop = EngineLoop(engine, config.max_waiting, config.heartbeat_s)
    apply_switch_interval(config)
    facts = dict(served_name=served_name, model_root=model_root,
                 vocab_size=engine.cfg.vocab_size, max_model_len=engine.max_model_len,
                 adapter_sources=dict(adapter_sources))
    if config.frontend == "thread":
        code = _serve_thread(loop, engine.codec, config, facts)
    else:
        code = _serve_process(loop, config, {**facts, "model_dir": model_dir})
    if loop.error is not None:
        log.error("the engine loop failed: %s", loop.error)
        return 1
    if code == 0:
        log.warning("server stopped")
    return code


def run_http(state, config: ServeConfig, server_class=None) -> None:
    """The app of ``state`` under uvicorn on this (the main) thread, until a signal or the
    engine's failure has drained it."""
    from moelora_dist.serve.app import create_app

    server = (server_class or _Server)(uvicorn_config(create_app(state), config), state.loop)
    state.loop.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn catches SIGTERM/SIGINT while it runs and raises them again on its way out to
    # whatever handler was there before: make that one a no-op, so the caller's drain runs
    # and the exit code is ours (0), not the signal's.
    _ignore_signals()
    try:
        server.run()
    finally:
        state.tokenizer_pool.shutdown(wait=False)


def _serve_thread(loop, codec, config: ServeConfig, facts: dict) -> int:
    from moelora_dist.serve.app import ServerState

    state = ServerState(loop, codec, **facts, api_key=config.api_key,
                        enable_lora_loading=config.enable_lora_loading,
                        adapter_root=config.adapter_root)
    loop.start()
    try:
        run_http(state, config)
    finally:
        # uvicorn has drained or cancelled every connection; what is left in the engine has
        # no client any more.
        loop.stop(deadline_s=0.0)
    return 0


def _serve_process(loop, config: ServeConfig, facts: dict) -> int:
    """The engine here, HTTP in the frontend child; its exit decides ours (module docstring)."""
    from moelora_dist.serve.bridge import EngineBridge, spawn_frontend

    proc, sock = spawn_frontend(config, facts)
    bridge = EngineBridge(loop, sock)

    def forward(sig, frame):
        loop.refuse_new()
        if proc.poll() is None:
            proc.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    loop.start()
    bridge.start()
    try:
        if not bridge.wait_ready(proc, READY_S):
            if proc.poll() is None:
                log.error("the HTTP frontend did not listen on %s:%d within %.0f s",
                          config.host, config.port, READY_S)
            else:
                log.error("the HTTP frontend exited with code %d before it listened on %s:%d "
                          "(its error is above)", proc.returncode, config.host, config.port)
            return 1
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        loop.stop(deadline_s=0.0)
        sock.close()
    if code != 0 and loop.error is None:
        log.error("the HTTP frontend exited with code %d; the server stops", code)
        return 1
    return 0


def _ignore_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


class _Server(uvicorn.Server):
    """uvicorn's server that also stops admission the moment a signal arrives."""

    def __init__(self, config, loop):
        super().__init__(config)
        self.engine_loop = loop

    def handle_exit(self, sig, frame):
        self.engine_loop.refuse_new()
        super().handle_exit(sig, frame)
