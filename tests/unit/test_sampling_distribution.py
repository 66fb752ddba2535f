"""The sampled distribution is softmax(logits / T) after top-k, top-p and min-p (Hugging Face's
order), by a chi-square test on a vocabulary of 8 over 8,192 draws (64 seeds x 128 steps).

The threshold: the p-value of the statistic must exceed 1e-4. The draws are deterministic
(fixed seeds), so the test cannot flake; the threshold says how unlucky the fixed seeds would
have to be for a correct sampler to fail (one chance in 10,000 per case), and is still far
above what a wrong distribution scores: each case also checks that the same counts reject a
nearby wrong distribution (filters dropped, or temperature off by 25%) with p < 1e-12, so the
test can fail. Tokens a filter removes must never appear (an exact check).
"""

import math

import pytest
import torch

from moelora_dist.engine.sampling import SamplingBatch, SamplingParams, sample

LOGITS = torch.tensor([2.0, 1.55, 1.2, 0.7, 0.35, 0.0, -0.6, -1.3])
NUM_SEEDS, NUM_STEPS = 64, 128
P_MIN, P_WRONG = 1e-4, 1e-12


def expected_probs(logits: torch.Tensor, t: float, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0, min_p_first: bool = False) -> torch.Tensor:
    """float64, written from the definitions (not from the code under test); Hugging Face's
    order, or vLLM's (min-p before top-k/top-p) with ``min_p_first``."""
    z = logits.double() / t
    keep = torch.ones_like(z, dtype=torch.bool)
    order = torch.argsort(z, descending=True)
    if min_p_first:
        probs = z.softmax(-1)
        keep &= probs >= min_p * probs.max()
    if top_k > 0:
        keep[order[top_k:]] = False
    if top_p < 1:
        probs = torch.where(keep, z, -math.inf).softmax(-1)
        before = 0.0
        for i in order.tolist():  # keep while the mass before the token is below top_p
            if before >= top_p:
                keep[i] = False
            before += float(probs[i])
    if min_p > 0 and not min_p_first:
        probs = torch.where(keep, z, -math.inf).softmax(-1)
        keep &= probs >= min_p * probs.max()
    return torch.where(keep, z, -math.inf).softmax(-1)


def draw_counts(params: SamplingParams, backend: str = "torch") -> torch.Tensor:
    V = LOGITS.shape[0]
    counts = torch.zeros(V, dtype=torch.float64)
    logits = LOGITS.expand(NUM_SEEDS, V).contiguous()
    seeds = [1000 + 7919 * s for s in range(NUM_SEEDS)]
    for step in range(NUM_STEPS):
        batch = SamplingBatch.from_params([params] * NUM_SEEDS, seeds, [step] * NUM_SEEDS, "cpu")
        tok = sample(logits, batch, backend=backend).token_ids_B
        counts += torch.bincount(tok, minlength=V).double()
    return counts


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's statistic over the tokens with probability > 0 (df = n - 1);
    1 for a single kept token."""
    support = probs > 0
    n = counts.sum()
    exp = probs[support] * n
    stat = ((counts[support] - exp) ** 2 / exp).sum()
    df = int(support.sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


CASES = [  # (params, a wrong distribution the counts must reject)
    (dict(temperature=1.0), dict(t=1.25)),
    (dict(temperature=0.6), dict(t=0.75)),
    (dict(temperature=1.5, top_k=4), dict(t=1.5)),  # top-k dropped
    (dict(temperature=0.8, top_p=0.7), dict(t=0.8)),  # top-p dropped
    (dict(temperature=1.2, min_p=0.3), dict(t=1.2)),  # min-p dropped
    (dict(temperature=2.0, top_k=6, top_p=0.8, min_p=0.2), dict(t=2.0, top_k=6)),
    (dict(temperature=0.9, top_k=5, top_p=0.9), dict(t=0.9, top_p=0.9)),  # top-k dropped
    # here the order matters: vLLM's (min-p first) keeps 2 tokens, Hugging Face's 3
    (dict(temperature=1.0, top_p=0.6, min_p=0.25),
     dict(t=1.0, top_p=0.6, min_p=0.25, min_p_first=True)),
]


@pytest.mark.parametrize("case, wrong", CASES, ids=[str(c[0]) for c in CASES])
def test_sampled_distribution_is_filtered_softmax(case, wrong):
    params = SamplingParams(**case)
    probs = expected_probs(LOGITS, params.temperature, max(params.top_k, 0), params.top_p,
                           params.min_p)
    counts = draw_counts(params)
    assert counts.sum() == NUM_SEEDS * NUM_STEPS
    assert counts[probs == 0].sum() == 0, (counts, probs)  # filtered tokens never appear
    p = chi_square_p(counts, probs)
    assert p > P_MIN, (p, counts.tolist(), (probs * counts.sum()).tolist())
    wrong_probs = expected_probs(LOGITS, **wrong)
    # the counts contradict the nearby wrong distribution (so the test could fail)
    assert counts[wrong_probs == 0].sum() > 0 or chi_square_p(counts, wrong_probs) < P_WRONG


def test_filters_keep_the_expected_support():
    """The cases above filter what they claim to (so 'filters dropped' is a different law)."""
    for case, _ in CASES[2:]:
        p = SamplingParams(**case)
        probs = expected_probs(LOGITS, p.temperature, max(p.top_k, 0), p.top_p, p.min_p)
        assert 1 < int((probs > 0).sum()) < LOGITS.numel(), case


def test_triton_kernel_draws_the_same_tokens():
    """The kernel (interpreter) draws the very tokens of the torch path on these cases, so the
    distribution test holds for it too (one batch of 8 rows per case: the interpreter is slow)."""
    V = LOGITS.shape[0]
    params = [SamplingParams(**case) for case, _ in CASES for _ in range(8)]
    n = len(params)
    batch = SamplingBatch.from_params(params, list(range(n)), [3 * i for i in range(n)], "cpu")
    logits = LOGITS.expand(n, V).contiguous()
    a = sample(logits, batch, backend="torch").token_ids_B
    b = sample(logits, batch, backend="triton").token_ids_B
    assert torch.equal(a, b)
