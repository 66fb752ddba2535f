"""Streaming text out of generated ids: incremental detokenization and stop strings.

    detok = codec.detokenizer(prompt_ids)        # IncrementalDetokenizer
    stops = StopMatcher(params.stop)
    for ids in steps:
        text, stopped = stops.feed(detok.push(ids))
        ...
    text, _ = stops.feed(detok.flush()); text += stops.flush()   # at the end (no stop)

Both are plain Python over a ``decode(ids) -> str`` callable, so they are tested without a
tokenizer library.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character
PROMPT_CONTEXT = 5  # prompt tokens decoded with the first generated ones (vLLM's offset)


class IncrementalDetokenizer:
    """Text deltas of a growing id sequence, with the prefix-offset technique of vLLM and TGI:
    every push decodes a short window that starts a few tokens back (``ids[prefix:]``) and
    emits only what it adds to the decode of the window's old part (``ids[prefix:read]``).

    Why a window rather than one token at a time: a token's text depends on its neighbours
    (SentencePiece drops the leading space of a sequence's first token, so ``decode([tok])``
    loses the space ``tok`` has mid-sentence) and a byte-level BPE token may hold part of a
    UTF-8 character. A delta is held back while the window's text ends in U+FFFD (an
    incomplete character), so a stream never shows a replacement character for bytes whose
    rest is on the way; the concatenated deltas (plus :meth:`flush`) equal the decode of
    the whole sequence.
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int] = ()):
        self._decode = decode
        self.ids: list[int] = list(prompt_ids)
        self._prefix = max(len(self.ids) - PROMPT_CONTEXT, 0)
        self._read = len(self.ids)
        self.text = ""  # everything emitted so far

    def push(self, ids: Sequence[int]) -> str:
        """Append generated ``ids``; return the new text they complete (maybe ``""``)."""
        self.ids.extend(int(i) for i in ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end becomes U+FFFD,
        as in the full decode). Call once, when the sequence ends."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) <= len(before) and not final:
            return ""
        if now.endswith(REPLACEMENT) and not final:
            return ""
        delta = now[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta


class StopMatcher:
    """Cuts a text stream at the first stop string, even one that spans deltas.

    :meth:`feed` returns the text that is safe to show now and whether a stop string was
    found; it holds back the longest tail that could be the start of a stop string, so a
    stream never shows text that a later delta turns into (or past) a stop. The stop string
    itself is not part of the output (vLLM's default); ``matched`` tells which one ended it.
    """

    def __init__(self, stop: tuple[str, ...]):
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.stop = tuple(stop)
        self._longest = max((len(s) for s in self.stop), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, delta: str) -> tuple[str, bool]:
        """``(text safe to emit now, stopped)``; after a stop, always ``("", True)``."""
        if self.stopped:
            return "", True
        if not self.stop:
            return delta, False
        buf = self._held + delta
        hits = [(i, s) for s in self.stop if (i := buf.find(s)) >= 0]
        if hits:
            i, self.matched = min(hits)
            self.stopped, self._held = True, ""
            return buf[:i], True
        hold = self._hold_length(buf)
        self._held = buf[len(buf) - hold:]
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """The held-back tail, when the stream ends without a stop."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held

    def _hold_length(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of a stop string."""
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
