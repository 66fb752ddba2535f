"""StopMatcher on every way of cutting a text into deltas, and the IncrementalDetokenizer on a
decode function written here (UTF-8 bytes per id), without any tokenizer library."""

import itertools
import random

import pytest

from moelora_dist.engine.text_stream import REPLACEMENT, IncrementalDetokenizer, StopMatcher


def _run(stop, deltas):
    m = StopMatcher(stop)
    shown, stopped_at = [], None
    for i, d in enumerate(deltas):
        part, stopped = m.feed(d)
        shown.append(part)
        if stopped:
            stopped_at = i
            break
    tail = m.flush()
    return "".join(shown) + tail, m, stopped_at


def _cuts(text):
    """Every split of ``text`` into at most 3 deltas, and 1-character deltas."""
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        yield [text[:i], text[i:j], text[j:]]
    yield list(text)


@pytest.mark.parametrize("text, stop, want", [
    ("Hello world. Goodbye", ("world",), "Hello "),
    ("abcabcabd", ("abcabd",), "abc"),  # a false start that overlaps the real one
    ("x = 1\n\nEND\nmore", ("\n\n", "END"), "x = 1"),  # the earliest of two
    ("東京は大きい", ("大き",), "東京は"),
    ("no stop here", ("zzz",), "no stop here"),
    ("stop", ("stop",), ""),  # at the very start
    ("aaab", ("aab",), "a"),
], ids=["word", "overlap", "two-stops", "cjk", "none", "start", "repeat"])
def test_stop_found_whatever_the_deltas(text, stop, want):
    for deltas in _cuts(text):
        got, m, _ = _run(stop, deltas)
        assert got == want, deltas
        assert m.stopped == (want != text), deltas


def test_never_shows_text_that_becomes_a_stop():
    """Before the stop is complete, nothing of it has been shown: the held tail is exactly
    the part that could still start a stop string."""
    m = StopMatcher(("<END>", "###"))
    assert m.feed("answer <E") == ("answer ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("X and #") == ("<ENX and ", False)  # not a stop after all
    assert m.feed("##tail") == ("", True) and m.matched == "###"
    assert m.feed("more") == ("", True) and m.flush() == ""


def test_flush_returns_the_held_tail_at_the_end():
    m = StopMatcher(("STOP",))
    assert m.feed("the end ST") == ("the end ", False)
    assert m.flush() == "ST" and not m.stopped


def test_no_stop_strings_pass_everything_through():
    m = StopMatcher(())
    assert m.feed("abc") == ("abc", False) and m.flush() == ""


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(("ok", ""))


def _byte_decode(vocab):
    def decode(ids):
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
    return decode


def test_detokenizer_random_byte_tokens():
    """Ids that each hold 1-3 bytes of a UTF-8 text, cut anywhere (inside characters too):
    deltas never carry U+FFFD and add up to the full decode, whatever the chunking."""
    rng = random.Random(0)
    text = "naïve café 😀🎉 東京 한국어 🦄 end"
    data = text.encode()
    vocab, ids, i = [], [], 0
    while i < len(data):
        n = rng.randint(1, 3)
        vocab.append(data[i:i + n])
        ids.append(len(vocab) - 1)
        i += n
    decode = _byte_decode(vocab)
    for _ in range(50):
        detok = IncrementalDetokenizer(decode)
        pos, deltas = 0, []
        while pos < len(ids):
            n = rng.randint(1, 4)
            deltas.append(detok.push(ids[pos:pos + n]))
            pos += n
        deltas.append(detok.flush())
        assert "".join(deltas) == text
        assert not any(REPLACEMENT in d for d in deltas)


def test_detokenizer_empty_push_and_flush():
    detok = IncrementalDetokenizer(_byte_decode([b"a"]))
    assert detok.push([]) == "" and detok.flush() == ""
    assert detok.push([0]) == "a" and detok.flush() == ""
