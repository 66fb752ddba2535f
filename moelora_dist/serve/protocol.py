"""The request bodies the server accepts (OpenAI's fields, and vLLM's extensions), checked once.

    req = parse_body(CompletionRequest, json_body)          # RequestInvalid naming the field
    params = sampling_params(req, max_tokens=16, seed=0)     # the engine's SamplingParams

Every field is declared; an unknown one is refused (a client that asks for something this
server does not do is told so, never silently ignored). OpenAI fields this engine cannot honour
are accepted only at their neutral value (``frequency_penalty: 0``, ``best_of`` equal to
``n``, ...), anything else is a 400 naming the field. vLLM's extensions: ``top_k``, ``min_p``,
``stop_token_ids``, ``ignore_eos``, ``return_token_ids`` (each choice then carries its
``token_ids`` and the response its ``prompt_token_ids``).
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moelora_dist.engine.sampling_params import SamplingError, SamplingParams
from moelora_dist.errors import MoeloraError


class RequestInvalid(MoeloraError):
    """A request body that cannot be served; ``param`` names the field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    n: int = Field(1, ge=1, le=128)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    return_token_ids: bool = False
    # OpenAI fields served only at their neutral value (check_neutral)
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None


class CompletionRequest(_Common):
    """``POST /v1/completions``: ``prompt`` is a text, texts, token ids or lists of them."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: Union[str, list[TextPart]]
    name: Optional[str] = None


class ChatRequest(_Common):
    """``POST /v1/chat/completions``: messages formatted by the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_int_id: Optional[int] = None


def parse_body(model: type[BaseModel], body) -> BaseModel:
    """``model`` from a decoded JSON body; :class:`RequestInvalid` naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestInvalid(f"the request body must be a JSON object, got "
                             f"{type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err["loc"] if not _is_union_tag(x)]
        field = loc[0] if loc else None
        where = ".".join(loc) or "body"
        if err["type"] == "extra_forbidden":
            raise RequestInvalid(f"unknown field {where!r}: this server does not support it",
                                 field) from None
        raise RequestInvalid(f"field {where!r}: {err['msg']}", field) from None


def _is_union_tag(x) -> bool:
    # pydantic names the union member it tried ("str", "list[int]", ...) inside the location
    return isinstance(x, str) and (x in ("str", "int") or x.startswith("list["))


def check_neutral(req: _Common) -> None:
    """Refuse OpenAI knobs this engine does not implement unless they are at their neutral
    value (module docstring)."""
    for name, neutral in (("frequency_penalty", 0.0), ("presence_penalty", 0.0),
                          ("repetition_penalty", 1.0)):
        value = getattr(req, name)
        if value is not None and value != neutral:
            raise RequestInvalid(f"{name}={value} is not supported by this server (only "
                                 f"{neutral})", name)
    if req.logit_bias:
        raise RequestInvalid("logit_bias is not supported by this server", "logit_bias")
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of != req.n:
            raise RequestInvalid(f"best_of={req.best_of} is not supported (only best_of == n)",
                                 "best_of")
        if req.suffix:
            raise RequestInvalid("suffix is not supported by this server", "suffix")
    if req.stream_options is not None and not req.stream:
        raise RequestInvalid("stream_options needs stream: true", "stream_options")


_FIELD = re.compile(r"sampling parameter '(\w+)'")


def sampling_params(req: _Common, *, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None, seed: int | None) -> SamplingParams:
    """The engine's parameters of one choice; :class:`RequestInvalid` names the field."""
    fields = dict(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                  seed=seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                  ignore_eos=req.ignore_eos, temperature=req.temperature, top_p=req.top_p,
                  top_k=req.top_k, min_p=req.min_p)
    try:
        return SamplingParams.from_dict(fields)
    except SamplingError as exc:
        m = _FIELD.search(str(exc))
        field = m.group(1) if m else None
        if field == "logprobs" and isinstance(req, ChatRequest):
            field = "top_logprobs"
        raise RequestInvalid(str(exc), field) from None


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice ``index`` of a request with ``seed``: its own stream of random numbers, so that
    ``n`` choices differ and each is reproducible (None: the engine draws one)."""
    if seed is None:
        return None
    return seed if index == 0 else (seed * 1_000_003 + index) % (1 << 63)
