"""SamplingParams: every bad value is a SamplingError naming its field and the fix; from_dict
lists the known keys for an unknown one; defaults and normalizations."""

import pytest

from moelora_dist.engine.sampling import SamplingError, SamplingParams
from moelora_dist.engine.sampling_params import KNOWN_KEYS, MAX_LOGPROBS, request_seed
from moelora_dist.errors import MoeloraError


@pytest.mark.parametrize("kwargs, field, fix", [
    (dict(temperature=-0.5), "temperature", ">= 0"),  # negative temperature
    (dict(temperature=float("nan")), "temperature", ">= 0"),
    (dict(temperature="hot"), "temperature", ">= 0"),
    (dict(top_p=0.0), "top_p", "(0, 1]"),  # top_p outside (0, 1]
    (dict(top_p=1.01), "top_p", "(0, 1]"),
    (dict(top_p=-0.2), "top_p", "(0, 1]"),
    (dict(top_k=-2), "top_k", "-1 / 0 for off"),  # top_k < -1
    (dict(top_k=2.5), "top_k", "integer"),
    (dict(top_k=True), "top_k", "integer"),  # a bool is not an int here
    (dict(min_p=-0.01), "min_p", "[0, 1]"),  # min_p outside [0, 1]
    (dict(min_p=1.5), "min_p", "[0, 1]"),
    (dict(max_tokens=0), "max_tokens", ">= 1"),  # max_tokens < 1
    (dict(max_tokens=-3), "max_tokens", ">= 1"),
    (dict(max_tokens=8.0), "max_tokens", "integer"),
    (dict(logprobs=MAX_LOGPROBS + 1), "logprobs", f"[0, {MAX_LOGPROBS}]"),  # too large
    (dict(logprobs=-1), "logprobs", f"[0, {MAX_LOGPROBS}]"),
    (dict(prompt_logprobs=100), "prompt_logprobs", f"[0, {MAX_LOGPROBS}]"),
    (dict(seed="abc"), "seed", "integer"),
    (dict(seed=1 << 64), "seed", "2**64"),
    (dict(stop=[""]), "stop", "non-empty"),
    (dict(stop=["ok", 3]), "stop", "non-empty string"),
    (dict(stop_token_ids=[-1]), "stop_token_ids", ">= 0"),
    (dict(stop_token_ids=["7"]), "stop_token_ids", "integers"),
    (dict(ignore_eos="yes"), "ignore_eos", "true or false"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_value_names_field_and_fix(kwargs, field, fix):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**kwargs)
    msg = str(info.value)
    assert f"'{field}'" in msg and fix in msg, msg
    assert "\n" not in msg
    assert isinstance(info.value, MoeloraError)


def test_validate_checks_vocabulary_dependent_fields():
    SamplingParams(stop_token_ids=[0, 99], logprobs=20).validate(vocab_size=100)
    with pytest.raises(SamplingError, match=r"'stop_token_ids'.*below the vocabulary size 100"):
        SamplingParams(stop_token_ids=[3, 100]).validate(vocab_size=100)
    with pytest.raises(SamplingError, match=r"'logprobs'.*at most 8"):
        SamplingParams(logprobs=10).validate(vocab_size=8)
    with pytest.raises(SamplingError, match=r"'prompt_logprobs'.*at most 5"):
        SamplingParams(prompt_logprobs=6).validate(vocab_size=1000, max_logprobs=5)
    # a top_k past the vocabulary keeps it all, as vLLM and Hugging Face do
    SamplingParams(top_k=10_000).validate(vocab_size=100)


def test_from_dict_unknown_keys_lists_the_known():
    with pytest.raises(SamplingError) as info:
        SamplingParams.from_dict({"temperature": 0.5, "max_new_tokens": 3, "topp": 0.9})
    msg = str(info.value)
    assert "'max_new_tokens'" in msg and "'topp'" in msg
    assert "known: " + ", ".join(KNOWN_KEYS) in msg
    with pytest.raises(SamplingError, match="must be a JSON object"):
        SamplingParams.from_dict([("temperature", 1.0)])


def test_from_dict_values_and_nulls():
    p = SamplingParams.from_dict({"temperature": 0, "top_p": None, "stop": "###",
                                  "stop_token_ids": [5, 6], "seed": None, "logprobs": 3})
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.top_p == 1.0  # null: the default
    assert p.stop == ("###",) and p.stop_token_ids == (5, 6)
    assert p.seed is None and p.logprobs == 3
    assert SamplingParams.from_dict(p.to_dict()) == p
    with pytest.raises(SamplingError, match="'top_k'"):
        SamplingParams.from_dict({"top_k": -5})


def test_defaults_and_greedy():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 1.0, 1.0, -1, 0.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (None, (), (), False)
    assert (p.logprobs, p.prompt_logprobs) == (None, None)
    assert not p.greedy
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1.3, top_k=1).greedy
    assert not SamplingParams(temperature=1e-6).greedy


def test_request_seed_keeps_a_given_seed_and_draws_otherwise():
    assert request_seed(SamplingParams(seed=7)) == 7
    drawn = {request_seed(SamplingParams()) for _ in range(8)}
    assert len(drawn) == 8 and all(0 <= s < 1 << 63 for s in drawn)
