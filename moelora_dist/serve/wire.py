"""What crosses the socket between the engine process and the HTTP frontend process: frames of
JSON, never a pickle.

    sock.sendall(encode({"op": "abort", "request_id": "cmpl-3"}))
    reader = FrameReader()
    for msg in reader.feed(sock.recv(1 << 16)): ...     # whole frames only, in order

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON. Each message is an
object with ``op``:

- frontend -> engine: ``add {id, request_id, prompt_ids, params, adapter}`` (``params``:
  :meth:`SamplingParams.to_dict`), ``abort {request_id}``, ``load_adapter {id, name, path}``,
  ``unload_adapter {id, name}``, ``refuse_new``, ``stop {deadline_s}``, ``ready`` (uvicorn
  listens);
- engine -> frontend: ``reply {id, ok, error?}`` for add / load / unload, ``outputs
  {outputs}`` (every output of one step, :meth:`RequestOutput.to_dict`), ``fail {error,
  request_ids}`` (requests ended by an engine failure), ``snapshot {metrics, adapters,
  waiting}`` (sent with the frame it precedes when it changed), ``dead {error}`` (the engine
  loop failed).

Errors are ``{type, message, param}``: ``type`` is ``ModelNotFound``, ``Overloaded``,
``ShuttingDown`` or ``RequestInvalid`` (any other user error: HTTP 400 as before), else the
exception's class name, which the frontend raises as :class:`RemoteError` (HTTP 500).
"""

from __future__ import annotations

import json
import struct

from moelora_dist.engine.outputs import EngineMetrics
from moelora_dist.errors import MoeloraError
from moelora_dist.serve.loop import ModelNotFound, Overloaded, ShuttingDown, Snapshot
from moelora_dist.serve.protocol import RequestInvalid

MAX_FRAME = 1 << 28  # a length past this is a corrupt stream, not a message
_HEADER = struct.Struct(">I")
_USER_ERRORS = (ModelNotFound, Overloaded, ShuttingDown)


class WireError(Exception):
    """The byte stream is not frames of JSON (a bug on the other side)."""


class RemoteError(Exception):
    """An error of the engine process that is not a user error (HTTP 500); ``kind`` is its
    class name there (the traceback is in the engine process's log)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def encode(msg: dict) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Whole messages out of a byte stream read in pieces of any size."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        """The messages completed by ``data`` (none while a frame is still partial)."""
        buf = self._buf
        buf += data
        out, pos = [], 0
        while len(buf) - pos >= 4:
            (n,) = _HEADER.unpack_from(buf, pos)
            if n > MAX_FRAME:
                raise WireError(f"a frame of {n} bytes: the stream is corrupt")
            if len(buf) - pos - 4 < n:
                break
            out.append(json.loads(bytes(buf[pos + 4:pos + 4 + n])))
            pos += 4 + n
        del buf[:pos]
        return out


def error_to_dict(exc: BaseException) -> dict:
    param = getattr(exc, "param", None)
    for cls in _USER_ERRORS:
        if isinstance(exc, cls):
            return {"type": cls.__name__, "message": str(exc), "param": param}
    kind = "RequestInvalid" if isinstance(exc, MoeloraError) else type(exc).__name__
    return {"type": kind, "message": str(exc), "param": param}


def error_from_dict(d: dict) -> Exception:
    kind, message = d["type"], d["message"]
    if kind == "RequestInvalid":
        return RequestInvalid(message, d.get("param"))
    for cls in _USER_ERRORS:
        if kind == cls.__name__:
            return cls(message)
    return RemoteError(kind, message)


def snapshot_to_dict(snap: Snapshot) -> dict:
    return {"op": "snapshot", "metrics": snap.metrics.to_dict(), "adapters": list(snap.adapters),
            "waiting": snap.waiting}


def snapshot_from_dict(d: dict) -> Snapshot:
    return Snapshot(EngineMetrics.from_dict(d["metrics"]), tuple(d["adapters"]), d["waiting"])
