"""TextCodec on tokenizers built here with the `tokenizers` library (no downloads): a byte-level
BPE trained on sentences with emoji and CJK, and a SentencePiece-style (Metaspace) one whose
tokens' text depends on their neighbours. Round trips, incremental deltas at every split point
equal the full decode, the chat template, EOS ids, no tokenizer, missing transformers."""

import json
import sys

import pytest

from moelora_dist.engine.text import TextCodec, TextError
from moelora_dist.engine.text_stream import REPLACEMENT, StopMatcher
from moelora_dist.errors import FileError

SENTENCES = [
    "Hello world, this is a small test of the tokenizer.",
    "日本語のテキストです。東京は大きい都市です。",
    "中文文本也在这里，北京欢迎你。",
    "emoji time 😀🎉👍🏽 party 🚀 rocket",
    "The quick brown fox jumps over the lazy dog.",
    "Mixed: café naïve – ok? 😀 日本 done.",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STRICT_TEMPLATE = ("{% if messages[0]['role'] != 'user' %}"
                   "{{ raise_exception('the first message must be the user') }}{% endif %}"
                   + TEMPLATE)


def _train(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "byte":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: "▁" marks a word start, the decoder drops the first one
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL + ["<unk>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return tok


def _write(path, kind="byte", template=TEMPLATE, configs=True):
    path.mkdir(parents=True, exist_ok=True)
    tok = _train(kind)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
    if template:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if configs:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
        (path / "config.json").write_text(json.dumps(
            {"model_type": "qwen3_moe", "eos_token_id": 2, "vocab_size": 420}))
    return path


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("byte"))


@pytest.fixture(scope="module")
def codec(byte_dir):
    return TextCodec.from_model_dir(byte_dir)


@pytest.fixture(scope="module")
def meta_codec(tmp_path_factory):
    return TextCodec.from_model_dir(_write(tmp_path_factory.mktemp("meta"), "meta", None,
                                           configs=False))


def _stream(detok, chunks):
    return "".join(detok.push(c) for c in chunks) + detok.flush()


def test_round_trip(codec):
    for text in SENTENCES + ["unseen: Ω ∑ 🦄 한국어", ""]:
        assert codec.decode(codec.encode(text)) == text


def test_deltas_at_every_split_point_equal_the_full_decode(codec):
    text = "emoji 😀🎉 and 東京 then 🦄 한국어 end"  # 🦄 and Hangul were never trained on
    ids = codec.encode(text)
    full = codec.decode(ids)
    assert full == text
    # some token boundary falls inside a character (else the test would prove nothing)
    assert any(codec.decode(ids[:i]).endswith(REPLACEMENT) for i in range(1, len(ids)))
    for i in range(len(ids) + 1):
        detok = codec.detokenizer()
        deltas = [detok.push(ids[:i]), detok.push(ids[i:]), detok.flush()]
        assert "".join(deltas) == full, i
        assert not any(REPLACEMENT in d for d in deltas), (i, deltas)
    detok = codec.detokenizer()
    deltas = [detok.push([t]) for t in ids]
    assert "".join(deltas) + detok.flush() == full and detok.text == full
    assert not any(REPLACEMENT in d for d in deltas)


def test_deltas_after_a_prompt(codec):
    prompt = codec.encode("日本語の")
    out = codec.encode("テキスト 😀 です")
    detok = codec.detokenizer(prompt)
    got = _stream(detok, [[t] for t in out])
    assert got == codec.decode(prompt + out)[len(codec.decode(prompt)):]


def test_tokens_that_read_differently_in_context(meta_codec):
    """SentencePiece drops a sequence's leading space: one token decoded alone loses the space
    it has mid-sentence. The window of previous tokens keeps it."""
    ids = meta_codec.encode("the quick brown fox jumps over the lazy dog")
    full = meta_codec.decode(ids)
    assert "".join(meta_codec.decode([t]) for t in ids) != full  # one at a time is wrong
    assert _stream(meta_codec.detokenizer(), [[t] for t in ids]) == full
    prompt, out = ids[:4], ids[4:]
    got = _stream(meta_codec.detokenizer(prompt), [[t] for t in out])
    assert got == full[len(meta_codec.decode(prompt)):] and got.startswith(" ")


def test_incomplete_tail_at_the_end_is_flushed_as_in_the_full_decode(codec):
    ids = codec.encode("ok 🦄")
    cut = next(i for i in range(len(ids), 0, -1) if codec.decode(ids[:i]).endswith(REPLACEMENT))
    detok = codec.detokenizer()
    held = detok.push(ids[:cut])
    assert REPLACEMENT not in held
    assert held + detok.flush() == codec.decode(ids[:cut])


def test_chat_template(codec, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "東京?"}]
    ids = codec.apply_chat_template(messages)
    want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n東京?<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert ids == codec.encode(want, add_special_tokens=False)
    assert codec.decode(ids, skip_special_tokens=False) == want
    im_start = codec.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3  # special tokens are single ids, not spelled out
    with pytest.raises(TextError, match="must be an object with a string 'role'"):
        codec.apply_chat_template([{"role": "user"}])
    with pytest.raises(TextError, match="non-empty list"):
        codec.apply_chat_template([])
    strict = TextCodec.from_model_dir(_write(tmp_path / "strict", template=STRICT_TEMPLATE))
    with pytest.raises(TextError, match="rejected the messages: the first message must be"):
        strict.apply_chat_template(messages)
    assert strict.apply_chat_template(messages[1:]) == codec.apply_chat_template(messages[1:])


def test_no_chat_template_is_a_text_error(meta_codec):
    with pytest.raises(TextError, match="has no chat template; send a prompt string"):
        meta_codec.apply_chat_template([{"role": "user", "content": "hi"}])


def test_eos_ids_from_generation_config_config_and_tokenizer(codec, meta_codec, tmp_path):
    # generation_config [0, 2], config 2, tokenizer <|im_end|> = 2: in that order, no repeats
    assert codec.eos_token_ids == (0, 2)
    assert meta_codec.eos_token_ids == (meta_codec.tokenizer.eos_token_id,) == (2,)
    d = _write(tmp_path / "wide")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 9999}))  # > vocab
    (d / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": [1],
                                                               "vocab_size": 420}}))
    assert TextCodec.from_model_dir(d).eos_token_ids == (1, 2)


def test_directory_without_tokenizer_is_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert TextCodec.from_model_dir(tmp_path) is None
    with pytest.raises(FileError, match="model directory .* does not exist"):
        TextCodec.from_model_dir(tmp_path / "missing")


def test_missing_transformers_says_what_to_install(byte_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(TextError) as info:
        TextCodec.from_model_dir(byte_dir)
    assert "install 'moelora_dist[text]'" in str(info.value) and "token ids" in str(info.value)


def test_broken_tokenizer_file_is_a_text_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(TextError, match="cannot load the tokenizer in"):
        TextCodec.from_model_dir(tmp_path)


def test_text_then_stop_string_across_tokens(codec):
    """The detokenizer's deltas through a StopMatcher: the stream ends right before a stop
    string that spans several tokens (and a multi-byte character)."""
    text = "Hello world 東京は大きい都市です。 more text"
    ids = codec.encode(text)
    for stop in [("東京は",), ("大きい", "world 東"), ("です。 mo",)]:
        detok, matcher = codec.detokenizer(), StopMatcher(stop)
        shown = ""
        for t in ids:
            part, stopped = matcher.feed(detok.push([t]))
            shown += part
            assert not any(s in shown for s in stop)
            if stopped:
                break
        assert matcher.stopped
        assert shown == text[:min(text.find(s) for s in stop)]
