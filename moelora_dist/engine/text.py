"""Text in and out: the model directory's tokenizer, its chat template and its EOS ids.

    codec = TextCodec.from_model_dir(model_dir)   # None: the directory has no tokenizer
    ids = codec.encode("Hello")                   # or codec.apply_chat_template(messages)
    detok = codec.detokenizer(ids)                # IncrementalDetokenizer (text_stream.py)

The tokenizer is loaded with transformers' ``AutoTokenizer`` from local files only (never a
download, never remote code). transformers is an optional extra (``pip install
'moelora_dist[text]'``: transformers, tokenizers, jinja2 for chat templates); without it a
model directory with a tokenizer still serves token ids, and asking for text raises a
:class:`TextError` that says what to install. The engine may call :meth:`from_model_dir` at
start-up and keep the error for the first text request, or call it on that request.
"""

from __future__ import annotations

import os

from moelora_dist.config.model import text_config
from moelora_dist.engine.text_stream import IncrementalDetokenizer, StopMatcher  # noqa: F401
from moelora_dist.errors import MoeloraError, one_line
from moelora_dist.files.paths import kind_of, read_json_object, require

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
INSTALL_HINT = "install 'moelora_dist[text]' (pip install 'moelora_dist[text]')"


class TextError(MoeloraError):
    """Text that cannot be handled as asked (no tokenizer, no chat template, a missing
    package, bad messages); the message says what to do instead."""


class TextCodec:
    """A model's tokenizer with the EOS ids the engine stops on."""

    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], model_dir: str = ""):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.model_dir = model_dir

    @classmethod
    def from_model_dir(cls, model_dir) -> "TextCodec | None":
        """The codec of ``model_dir``, or None when it has neither ``tokenizer.json`` nor
        ``tokenizer_config.json``. :class:`TextError` when it has one but transformers is
        not installed or the files cannot be loaded."""
        model_dir = str(require(model_dir, "dir", "model directory"))
        if not any(kind_of(os.path.join(model_dir, f)) == "file" for f in TOKENIZER_FILES):
            return None
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TextError(f"{model_dir} has a tokenizer, but text needs transformers: "
                            f"{INSTALL_HINT}, or send token ids") from None
        try:
            tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                                trust_remote_code=False)
        except ImportError as exc:
            raise TextError(f"the tokenizer in {model_dir} needs a missing package "
                            f"({one_line(exc)}); {INSTALL_HINT} and that package") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TextError(f"cannot load the tokenizer in {model_dir}: "
                            f"{type(exc).__name__}: {one_line(exc)}") from None
        return cls(tok, eos_token_ids(model_dir, tok.eos_token_id), model_dir)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows (special tokens included)."""
        return len(self.tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt string (with the tokenizer's BOS where it adds one)."""
        if not isinstance(text, str):
            raise TextError(f"a text prompt must be a string, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict],
                            add_generation_prompt: bool = True) -> list[int]:
        """Token ids of chat ``messages`` (``[{"role": ..., "content": str}, ...]``) formatted
        by the model's chat template, ending with the assistant's turn opened. Rendered to a
        string, then encoded without adding special tokens (the template writes them)."""
        check_messages(messages)
        if not getattr(self.tokenizer, "chat_template", None):
            raise TextError(f"the tokenizer in {self.model_dir} has no chat template; send a "
                            "prompt string or token ids instead of messages")
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except ImportError:
            raise TextError(f"chat templates need jinja2: {INSTALL_HINT}") from None
        except Exception as exc:  # jinja2's TemplateError and what a template raises itself
            if type(exc).__module__.split(".")[0] != "jinja2":
                raise
            raise TextError(f"the chat template of {self.model_dir} rejected the messages: "
                            f"{one_line(exc)}") from None
        return self.encode(rendered, add_special_tokens=False)

    def detokenizer(self, prompt_ids: list[int] = ()) -> IncrementalDetokenizer:
        """An incremental detokenizer for one sequence; ``prompt_ids`` give the first
        generated tokens their context (pass the prompt)."""
        return IncrementalDetokenizer(self.decode, prompt_ids)


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise TextError("chat messages must be a non-empty list of "
                        '{"role": ..., "content": ...} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise TextError(f"chat message {i} must be an object with a string 'role' and a "
                            f"string 'content', got {m!r}"[:300])


def eos_token_ids(model_dir: str, tokenizer_eos: int | None = None) -> tuple[int, ...]:
    """EOS ids, in order of authority and without repeats: ``generation_config.json``'s
    ``eos_token_id`` (an id or a list), ``config.json``'s (or its ``text_config``'s), the
    tokenizer's; ids at or past the config's ``vocab_size`` are dropped."""
    found: list[int] = []
    vocab = None
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if kind_of(path) != "file":
            continue
        raw = read_json_object(path, name.replace(".json", "").replace("_", " "))
        if name == "config.json":
            raw = text_config(raw)
            vocab = raw.get("vocab_size") if isinstance(raw.get("vocab_size"), int) else None
        found += _ids(raw.get("eos_token_id"))
    found += _ids(tokenizer_eos)
    out: list[int] = []
    for e in found:
        if e not in out and (vocab is None or e < vocab):
            out.append(e)
    return tuple(out)


def _ids(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
