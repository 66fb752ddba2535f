"""Request files of ``generate`` / ``logits`` with the engine's keys: sampling options per
request (checked before the model loads, unknown keys refused), text prompts, zero-token lines,
and the outputs they add (logprobs; sampled tokens reproducible by seed)."""

import json

import pytest

import moelora_dist.models.model as model_mod
from moelora_dist.cli.main import main as cli_main
from tests.hf_factory import make_model, save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(make_model("qwen3_moe"), tmp_path_factory.mktemp("m"))


def _gen(tmp_path, model_dir, lines, *extra):
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    rc = cli_main(["generate", "--model", str(model_dir), "--requests", str(req), "--out",
                   str(out), "--device", "cpu", "--num-pages", "64", *extra])
    return rc, ([json.loads(x) for x in out.read_text().splitlines()] if rc == 0 else None)


@pytest.mark.parametrize("line,needle", [
    ({"input_ids": [5], "max_new_tokens": 2, "temprature": 0.5}, "unknown key(s) ['temprature']"),
    ({"input_ids": [5], "max_new_tokens": 2, "temperature": -1},
     "sampling parameter 'temperature' must be a number >= 0"),
    ({"input_ids": [5], "max_new_tokens": 2, "top_p": 0}, "'top_p' must be a number in (0, 1]"),
    ({"input_ids": [5], "max_new_tokens": 2, "logprobs": 99}, "'logprobs'"),
    ({"input_ids": [5], "max_new_tokens": 2, "stop_token_ids": [999]}, "'stop_token_ids'"),
    ({"prompt": "hi", "max_new_tokens": 2}, "needs a tokenizer"),
    ({"input_ids": [5], "prompt": "hi", "max_new_tokens": 2}, "give exactly one of"),
    ({"messages": [], "max_new_tokens": 2}, "'messages' must be a non-empty list"),
    ({"input_ids": [5], "max_new_tokens": 2, "stop": ["x"]}, "stop strings need"),
    ({"input_ids": [5] * 120, "max_new_tokens": 20}, "exceed the model's 128 positions"),
], ids=["unknown_key", "temperature", "top_p", "logprobs", "stop_token_ids", "text_no_tokenizer",
        "two_prompts", "empty_messages", "stop_no_tokenizer", "too_long"])
def test_bad_request_lines_fail_before_the_model_loads(tmp_path, model_dir, capsys, monkeypatch,
                                                       line, needle):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(model_mod.MoELoRAModel, "build", refuse)
    rc, _ = _gen(tmp_path, model_dir, [{"input_ids": [1], "max_new_tokens": 1}, line])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and needle in err[0] and "request line 1" in err[0], err


def test_sampling_keys_logprobs_and_zero_token_lines(tmp_path, model_dir):
    lines = [{"input_ids": [3, 4, 5], "max_new_tokens": 5, "temperature": 0.8, "top_p": 0.9,
              "seed": 11, "ignore_eos": True, "logprobs": 2, "prompt_logprobs": 1},
             {"input_ids": [6, 7], "max_new_tokens": 0},
             {"input_ids": [8], "max_new_tokens": 3, "ignore_eos": True}]
    rc, first = _gen(tmp_path, model_dir, lines)
    rc2, again = _gen(tmp_path, model_dir, lines, "--max-batch-tokens", "2")
    assert rc == rc2 == 0
    assert first[0]["output_ids"] == again[0]["output_ids"] and len(first[0]["output_ids"]) == 5
    assert [len(x["top"]) for x in first[0]["logprobs"]] == [2] * 5
    assert first[0]["prompt_logprobs"][0] is None and len(first[0]["prompt_logprobs"]) == 3
    assert first[1] == {"request": 1, "output_ids": [], "finish_reason": "length"}
    assert "logprobs" not in first[2] and len(first[2]["output_ids"]) == 3
    assert "text" not in first[0]  # no tokenizer in this model directory
