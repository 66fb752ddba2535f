"""The HTTP application: OpenAI's routes (and vLLM's adapter routes) on FastAPI.

    state = ServerState(loop, codec, served_name="base", ...)
    app = create_app(state)          # an ASGI app; uvicorn serves it (serve/server.py)

Routes: ``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``POST /v1/load_lora_adapter``, ``POST
/v1/unload_lora_adapter``. Every error is OpenAI's error object (:func:`error_body`) with
the status of :data:`STATUS`; anything that is not a user error is a 500 whose traceback goes
to the log, never to the client. Authentication is an ASGI middleware in front of every
route but ``/health`` (it never buffers a stream, so disconnects still reach the routes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from moelora_dist.errors import MoeloraError
from moelora_dist.serve import generation
from moelora_dist.serve.loop import ModelNotFound, Overloaded, ShuttingDown
from moelora_dist.serve.metrics import ServerMetrics
from moelora_dist.serve.protocol import (LoadAdapterRequest, RequestInvalid,
                                         UnloadAdapterRequest, parse_body)
from moelora_dist.serve.responses import TokenText, error_body
from moelora_dist.serve.security import (Forbidden, Unauthorized, check_bearer,
                                         resolve_adapter_path)
from moelora_dist.serve.wire import RemoteError

log = logging.getLogger(__name__)

# error class -> (HTTP status, OpenAI error type); checked in order, the first match wins
STATUS = ((Unauthorized, 401, "authentication_error"), (Forbidden, 403, "permission_error"),
          (ModelNotFound, 404, "not_found_error"), (Overloaded, 429, "rate_limit_error"),
          (ShuttingDown, 503, "service_unavailable"),
          (MoeloraError, 400, "invalid_request_error"))


@dataclass
class ServerState:
    """What the routes share: the engine loop (:class:`~.loop.EngineLoop` in this process, or
    :class:`~.remote.RemoteLoop` to the engine's) and the facts of the served model."""

    loop: object
    codec: object
    served_name: str
    model_root: str
    vocab_size: int
    max_model_len: int
    adapter_sources: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    enable_lora_loading: bool = False
    adapter_root: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.metrics = ServerMetrics(self.loop)
        self.token_text = TokenText(self.codec)
        self.tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    def resolve_model(self, name: str) -> str | None:
        """None for the base model, the adapter's name for an adapter; 404 otherwise."""
        if name == self.served_name:
            return None
        loaded = self.loop.snapshot.adapters
        if name in loaded:
            return name
        raise ModelNotFound(f"the model {name!r} does not exist; loaded: "
                            f"{[self.served_name, *loaded]}")


def error_response(exc: BaseException) -> JSONResponse:
    for kind, status, name in STATUS:
        if isinstance(exc, kind):
            param = getattr(exc, "param", None)
            return JSONResponse(error_body(str(exc), name, status, param), status_code=status)
    log.error("internal error", exc_info=exc)
    kind = exc.kind if isinstance(exc, RemoteError) else type(exc).__name__
    return JSONResponse(error_body(f"internal server error ({kind}); see the server log",
                                   "internal_error", 500), status_code=500)


class AuthMiddleware:
    """``Authorization: Bearer <key>`` on every route but ``/health`` (pure ASGI)."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            try:
                check_bearer(header, self.api_key)
            except Unauthorized as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestInvalid(f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestInvalid("the request body's JSON is nested too deeply") from None


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="moelora_dist", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(Exception)
    async def _any(request, exc):
        return error_response(exc)

    @app.exception_handler(MoeloraError)
    async def _user(request, exc):
        if isinstance(exc, (Overloaded, ShuttingDown)):
            state.metrics.rejected.labels("overloaded" if isinstance(exc, Overloaded)
                                          else "shutting_down").inc()
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error",
                                       exc.status_code), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return JSONResponse(error_body("the engine has stopped", "service_unavailable",
                                           503), status_code=503)
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        def card(name, root, parent):
            return {"id": name, "object": "model", "created": state.created,
                    "owned_by": "moelora_dist", "root": root, "parent": parent,
                    "max_model_len": state.max_model_len}

        data = [card(state.served_name, state.model_root, None)]
        data += [card(n, state.adapter_sources.get(n, "memory"), state.served_name)
                 for n in state.loop.snapshot.adapters]
        return {"object": "list", "data": data}

    async def _generate(request: Request, kind: str):
        run, req = await generation.prepare(state, kind, await _json(request))
        await run.start()
        if req.stream:
            return StreamingResponse(generation.stream(run, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await generation.whole(run, req, request))
        except generation.ClientGone:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _generate(request, "chat")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        body = parse_body(LoadAdapterRequest, await _json(request))
        path = resolve_adapter_path(body.lora_path, state.adapter_root, state.enable_lora_loading)
        name = body.lora_name
        if name == state.served_name:
            raise RequestInvalid(f"lora_name {name!r} is the base model's name", "lora_name")
        await asyncio.wrap_future(state.loop.load_adapter(name, path))
        state.adapter_sources[name] = path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        body = parse_body(UnloadAdapterRequest, await _json(request))
        if not state.enable_lora_loading:
            raise Forbidden("run-time adapter loading is off; start the server with "
                            "--enable-lora-loading --adapter-root DIR")
        await asyncio.wrap_future(state.loop.unload_adapter(body.lora_name))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed "
                                 "successfully.")

    return AuthMiddleware(app, state.api_key) if state.api_key else app

