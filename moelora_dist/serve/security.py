"""The server's guards: the API key, and where run-time adapter loads may read from.

API key: with ``--api-key KEY`` (or ``$MOELORA_API_KEY``) every endpoint but ``/health``
needs ``Authorization: Bearer KEY``; the comparison takes the same time whatever the key
(``hmac.compare_digest``), so the key cannot be guessed a byte at a time.

Adapter paths: ``POST /v1/load_lora_adapter`` is off unless the server was started with
``--enable-lora-loading``, and then reads only from under ``--adapter-root``. A path is
resolved (relative ones against the root) with every symlink followed and every ``..``
removed, and must still lie under the resolved root; the resolved path is what the loader
reads, so a symlink swapped after the check cannot redirect it. The loader itself reads only
safetensors (``adapter_model.safetensors``) and JSON, never a pickle.
"""

from __future__ import annotations

import hmac
import os

from moelora_dist.errors import MoeloraError

API_KEY_ENV = "MOELORA_API_KEY"


class Unauthorized(MoeloraError):
    """A missing or wrong API key (HTTP 401)."""


class Forbidden(MoeloraError):
    """An operation the server's settings do not allow (HTTP 403)."""


def check_bearer(header: str | None, api_key: str) -> None:
    """Raise :class:`Unauthorized` unless ``header`` is ``Bearer <api_key>``."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise Unauthorized("the API key is not valid")


def resolve_adapter_path(path: str, root: str | None, enabled: bool) -> str:
    """The real path of an adapter directory to load at run time (module docstring);
    :class:`Forbidden` when loading is off or the path leaves the root."""
    if not enabled or root is None:
        raise Forbidden("run-time adapter loading is off; start the server with "
                        "--enable-lora-loading --adapter-root DIR")
    real_root = os.path.realpath(root)
    candidate = path if os.path.isabs(path) else os.path.join(real_root, path)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real, real_root]) != real_root:
        raise Forbidden(f"lora_path {path!r} resolves outside --adapter-root ({real_root}); "
                        "only adapters under it can be loaded")
    return real
