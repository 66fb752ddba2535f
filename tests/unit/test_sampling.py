"""sample(): greedy is argmax; top_k=1 and temperature -> 0 are greedy; a row's token depends on
its own logits, params, seed and step only; it matches the row-by-row reference; logprobs are
log_softmax of the unmodified logits; no host reads; sorts only when a row needs them; static
(graph) batches. Both backends: "torch" (the CPU path) and "triton" (the interpreter)."""

import random

import pytest
import torch

from moelora_dist.engine.sampling import (FULL, SamplingBatch, SamplingParams, sample)
from moelora_dist.engine.sampling_reference import sample_reference

BACKENDS = ["torch", "triton"]
V = 2500  # more than one kernel chunk (2048), not a multiple of it
V_SMALL = 300  # one chunk: for tests that call the (slow) interpreter many times


def _batch(params, seeds=None, steps=None):
    seeds = list(range(100, 100 + len(params))) if seeds is None else seeds
    steps = [3] * len(params) if steps is None else steps
    return SamplingBatch.from_params(params, seeds, steps, "cpu")


def _random_params(rng: random.Random) -> SamplingParams:
    kind = rng.choice(["greedy", "plain", "top_k", "top_p", "min_p", "all"])
    t = rng.choice([0.3, 0.7, 1.0, 1.6])
    return {"greedy": SamplingParams(temperature=0.0),
            "plain": SamplingParams(temperature=t),
            "top_k": SamplingParams(temperature=t, top_k=rng.choice([2, 5, 40, 300])),
            "top_p": SamplingParams(temperature=t, top_p=rng.choice([0.3, 0.8, 0.95])),
            "min_p": SamplingParams(temperature=t, min_p=rng.choice([0.02, 0.2])),
            "all": SamplingParams(temperature=t, top_k=60, top_p=0.9, min_p=0.05)}[kind]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_argmax(backend, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(6, V) * 4).to(dtype)
    logits[1, 2100] = logits[1, 700] = logits[1].max() + 1  # a tie across chunks: first index
    logits[2, :] = 0.0  # all tied: index 0
    greedy = [SamplingParams(temperature=0.0)] * 6
    out = sample(logits, _batch(greedy), backend=backend)  # all-greedy batch
    assert torch.equal(out.token_ids_B, logits.argmax(-1))
    # greedy rows inside a batch that samples others go through the sampling kernel
    mixed = greedy[:3] + [SamplingParams(temperature=1.0, top_p=0.9)] + greedy[3:]
    logits_m = torch.cat([logits[:3], logits[:1], logits[3:]])
    out = sample(logits_m, _batch(mixed), backend=backend)
    keep = [0, 1, 2, 4, 5, 6]
    assert torch.equal(out.token_ids_B[keep], logits.argmax(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_1_and_temperature_to_zero_are_greedy(backend):
    torch.manual_seed(1)
    logits = torch.randn(32, V_SMALL) * 2
    # the top logit leads the next by >= 0.5: at T <= 1e-2 the noise (Gumbel, < 20) times T
    # cannot bridge it
    top2 = logits.topk(2).values
    logits[torch.arange(32), logits.argmax(-1)] += (0.5 - (top2[:, 0] - top2[:, 1])).clamp(min=0)
    want = logits.argmax(-1)
    seeds, steps = list(range(32)), list(range(32))
    for p in [SamplingParams(temperature=1.7, top_k=1), SamplingParams(top_k=1, top_p=0.5),
              SamplingParams(temperature=1e-2), SamplingParams(temperature=1e-4, min_p=0.5),
              SamplingParams(temperature=1e-6, top_p=0.99)]:
        out = sample(logits, _batch([p] * 32, seeds, steps), backend=backend)
        assert torch.equal(out.token_ids_B, want), p
    # ... while at T = 1 they are not all greedy (the case above is not vacuous)
    out = sample(logits, _batch([SamplingParams()] * 32, seeds, steps), backend=backend)
    assert not torch.equal(out.token_ids_B, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_tokens_whatever_else_is_in_the_batch(backend):
    rng = random.Random(5)
    torch.manual_seed(5)
    n = 12
    logits = torch.randn(n, V) * 2
    params = [_random_params(rng) for _ in range(n)]
    seeds = [rng.randrange(1 << 63) for _ in range(n)]
    steps = [rng.randrange(1000) for _ in range(n)]
    base = sample(logits, _batch(params, seeds, steps), backend=backend).token_ids_B
    # reorder the rows and add others (other params, seeds, steps) in between
    order = list(range(n))
    rng.shuffle(order)
    extra = 9
    rows = order + [-1] * extra
    rng.shuffle(rows)
    extra_logits = torch.randn(extra, V) * 3
    big_logits, big_params, big_seeds, big_steps, j = [], [], [], [], 0
    for r in rows:
        if r < 0:
            big_logits.append(extra_logits[j])
            big_params.append(_random_params(rng))
            big_seeds.append(rng.randrange(1 << 63))
            big_steps.append(rng.randrange(1000))
            j += 1
        else:
            big_logits.append(logits[r])
            big_params.append(params[r])
            big_seeds.append(seeds[r])
            big_steps.append(steps[r])
    out = sample(torch.stack(big_logits), _batch(big_params, big_seeds, big_steps),
                 backend=backend).token_ids_B
    for pos, r in enumerate(rows):
        if r >= 0:
            assert out[pos] == base[r], (r, params[r])


@pytest.mark.parametrize("backend", BACKENDS)
def test_different_seeds_and_steps_differ(backend):
    logits = torch.zeros(64, V_SMALL)  # uniform: every draw is the hash's
    p = [SamplingParams(temperature=1.0)] * 64
    by_seed = sample(logits, _batch(p, list(range(64)), [0] * 64), backend=backend).token_ids_B
    by_step = sample(logits, _batch(p, [42] * 64, list(range(64))), backend=backend).token_ids_B
    assert len(set(by_seed.tolist())) > 55 and len(set(by_step.tolist())) > 55
    again = sample(logits, _batch(p, list(range(64)), [0] * 64), backend=backend).token_ids_B
    assert torch.equal(by_seed, again)
    # a seed is taken mod 2**64: -1 and 2**64 - 1 are one seed
    a = sample(logits[:1], _batch(p[:1], [-1], [5]), backend=backend).token_ids_B
    b = sample(logits[:1], _batch(p[:1], [(1 << 64) - 1], [5]), backend=backend).token_ids_B
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_row_by_row_reference_and_logprobs_are_log_softmax(backend, dtype):
    rng = random.Random(11)
    torch.manual_seed(11)
    n = 40
    logits = (torch.randn(n, V) * rng.choice([1.0, 3.0])).to(dtype)
    params = [_random_params(rng) for _ in range(n)]
    seeds = [rng.randrange(-(1 << 63), 1 << 64) for _ in range(n)]
    steps = [rng.randrange(1 << 20) for _ in range(n)]
    out = sample(logits, _batch(params, seeds, steps), num_logprobs=5, backend=backend)
    ref = sample_reference(logits, params, seeds, steps, num_logprobs=5)
    assert torch.equal(out.token_ids_B, ref.token_ids_B)
    logp = torch.log_softmax(logits.float(), -1)
    # fp32 log-sum-exp over 2,500 entries: a few ulps of values up to ~|20|
    assert torch.allclose(out.logprob_B, logp.gather(1, out.token_ids_B[:, None]).squeeze(1),
                          atol=1e-5, rtol=1e-6)
    assert torch.allclose(out.logprob_B, ref.logprob_B, atol=1e-5, rtol=1e-6)
    assert out.top_ids_BN.shape == (n, 5) and out.top_logprobs_BN.dtype == torch.float32
    assert torch.allclose(out.top_logprobs_BN, logp.topk(5).values, atol=1e-5, rtol=1e-6)
    assert torch.equal(logp.gather(1, out.top_ids_BN), logp.topk(5).values)
    assert out.token_ids_B.dtype == torch.int64 and out.logprob_B.dtype == torch.float32


def test_sample_makes_no_host_reads(monkeypatch):
    """The torch path's Python never reads a tensor's value (what a CUDA graph forbids); the
    Triton path is captured in a graph by tests/gpu/test_sampling_gpu.py."""
    rng = random.Random(2)
    params = [_random_params(rng) for _ in range(10)] + [SamplingParams(top_p=0.5)]
    batch = _batch(params)
    logits = torch.randn(11, 300)

    def host_read(*_a, **_k):
        raise AssertionError("sample() read a tensor on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy",
                 "cpu"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    sample(logits, batch, num_logprobs=3, backend="torch")


def test_sorts_only_when_a_row_needs_top_p_or_top_k(monkeypatch):
    def forbidden(*_a, **_k):
        raise AssertionError("sorted without need")

    plain = [SamplingParams(temperature=0.8, min_p=0.1), SamplingParams(temperature=0.0)]
    assert _batch(plain).filter_width == 0
    top_k = plain + [SamplingParams(top_k=20), SamplingParams(top_k=33)]
    assert _batch(top_k).filter_width == 64  # a power of two >= the largest top_k
    top_p = top_k + [SamplingParams(top_p=0.9)]
    assert _batch(top_p).filter_width == FULL
    assert _batch([SamplingParams(top_p=0.5, temperature=0)]).filter_width == 0  # greedy
    logits = torch.randn(5, 200)
    monkeypatch.setattr(torch, "sort", forbidden)
    monkeypatch.setattr(torch, "topk", forbidden)
    sample(logits[:2], _batch(plain), backend="torch")
    monkeypatch.undo()
    monkeypatch.setattr(torch, "sort", forbidden)
    sample(logits[:4], _batch(top_k), backend="torch")
    monkeypatch.undo()
    with monkeypatch.context() as m:
        m.setattr(torch, "sort", forbidden)
        with pytest.raises(AssertionError, match="sorted without need"):
            sample(logits, _batch(top_p), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_batch_copy_into_samples_as_the_batch(backend):
    rng = random.Random(4)
    static = SamplingBatch.empty(16, "cpu")
    logits = torch.randn(16, V)
    for n in (16, 5, 9):
        params = [_random_params(rng) for _ in range(n)]
        seeds = [rng.randrange(1 << 40) for _ in range(n)]
        batch = _batch(params, seeds, list(range(n)))
        batch.copy_into(static)
        out = sample(logits, static, num_logprobs=2, backend=backend)  # what a replay computes
        want = sample(logits[:n], batch, num_logprobs=2, backend=backend)
        assert torch.equal(out.token_ids_B[:n], want.token_ids_B)
        assert torch.equal(out.top_ids_BN[:n], want.top_ids_BN)


def test_covers_and_copy_into_refuse_an_uncovered_batch():
    greedy_static = SamplingBatch.empty(8, "cpu", all_greedy=True)
    top_k_static = SamplingBatch.empty(8, "cpu", filter_width=32)
    sampled = _batch([SamplingParams(temperature=0.5)])
    assert not greedy_static.covers(sampled) and top_k_static.covers(sampled)
    assert not top_k_static.covers(_batch([SamplingParams(top_p=0.9)]))
    assert not top_k_static.covers(_batch([SamplingParams(top_k=40)]))
    assert not SamplingBatch.empty(2, "cpu").covers(_batch([SamplingParams()] * 3))
    with pytest.raises(ValueError, match="cannot sample 1 rows"):
        sampled.copy_into(greedy_static)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    out = sample(torch.zeros(0, 50), _batch([]), num_logprobs=2, backend=backend)
    assert out.token_ids_B.shape == (0,) and out.top_ids_BN.shape == (0, 2)


def test_from_params_needs_one_seed_and_step_per_row():
    with pytest.raises(ValueError, match="one seed and one step per row"):
        SamplingBatch.from_params([SamplingParams()] * 2, [1], [0, 0], "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_a_cut_are_all_kept(backend):
    """top_k=2 and top_p=0.6 both cut inside the three tied logits: all three stay (a sort's
    order among equal logits is arbitrary), in the fast path and in the reference."""
    from moelora_dist.engine.sampling_reference import kept_mask

    logits = torch.tensor([2.0, 1.0, 1.0, 1.0, -1.0, -2.0])
    for p in (SamplingParams(top_k=2), SamplingParams(top_p=0.6)):
        assert kept_mask(logits, p).tolist() == [True] * 4 + [False] * 2
        seen = set()
        for step in range(2 if backend == "triton" else 32):
            batch = _batch([p] * 64, list(range(64)), [step] * 64)
            seen |= set(sample(logits.expand(64, 6), batch, backend=backend).token_ids_B.tolist())
        assert seen == {0, 1, 2, 3}, p
