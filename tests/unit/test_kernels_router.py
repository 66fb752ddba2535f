"""The one-launch top-k router kernel (Triton interpreter) against its reference.

Random logits in fp32 (no ties): ids in the reference's order and weights to fp32 rounding.
bf16 logits tie often inside the top k (37 rows of 128 experts: several ties), so there the
comparison is per expert: the same set of ids, each with the reference's weight. At the top-k
boundary the kernel keeps the lowest expert ids among equal scores (pinned here against an
explicit rule, and on a GPU against ``torch.topk``'s CUDA gather, which keeps the same set).
"""

import pytest
import torch

from moelora_dist.kernels.router import naive, ops

pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _by_expert(w, ids, E):
    """[T, E] weight of each chosen expert (0 elsewhere); unchosen and sentinel ids dropped."""
    out = torch.zeros(w.shape[0], E + 1, dtype=torch.float64)
    out.scatter_(1, torch.where(ids < 0, E, ids).long(), w.double())
    return out[:, :E]


def _clear_boundary(x, K):
    """Rows whose K-th and (K+1)-th largest logits differ: there the chosen set is defined
    whatever a top-k does with ties (CPU ``torch.topk`` does not keep the lowest ids)."""
    if K == x.shape[1]:
        return torch.ones(x.shape[0], dtype=torch.bool)
    top = x.float().topk(K + 1, dim=1).values
    return top[:, K - 1] != top[:, K]


CASES = [(128, 8, 37, True), (8, 2, 5, True), (60, 4, 3, False), (256, 8, 20, False),
         (16, 16, 4, True), (32, 1, 9, False)]


@pytest.mark.parametrize("E,K,T,renorm", CASES, ids=[f"E{c[0]}K{c[1]}T{c[2]}" for c in CASES])
def test_softmax_topk_matches_reference_fp32(E, K, T, renorm):
    x = torch.randn(T, E, generator=torch.Generator().manual_seed(E + K)) * 3
    w, ids = ops.softmax_topk(x, K, renorm)
    w_ref, ids_ref = naive.softmax_topk(x, K, renorm)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("E,K,T,renorm", CASES[:4], ids=[f"E{c[0]}K{c[1]}T{c[2]}" for c in CASES[:4]])
def test_topk_softmax_matches_reference(E, K, T, renorm):
    g = torch.Generator().manual_seed(E * K)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(T, E, generator=g) * 3).to(dtype)
        x = x[_clear_boundary(x, K)]
        w, ids = ops.topk_softmax(x, K)
        w_ref, ids_ref = naive.topk_softmax(x, K)
        # bf16: a weight is rounded to bf16 after the softmax, as transformers does
        tol = dict(rtol=8e-3, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(_by_expert(w, ids, E), _by_expert(w_ref, ids_ref, E), **tol)
        if dtype == torch.float32:
            assert torch.equal(ids, ids_ref)


def test_bf16_ties_give_the_reference_set_and_weights():
    E, K, T = 128, 8, 64
    x = torch.randn(T, E, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    x = x[_clear_boundary(x, K)]
    w, ids = ops.softmax_topk(x, K, True)
    w_ref, ids_ref = naive.softmax_topk(x, K, True)
    assert not torch.equal(ids, ids_ref), "no tie inside the top k: the case tests nothing"
    assert torch.equal(ids.sort(1).values, ids_ref.sort(1).values)
    torch.testing.assert_close(_by_expert(w, ids, E), _by_expert(w_ref, ids_ref, E),
                               rtol=2e-6, atol=1e-7)
    # descending scores, as torch.topk(sorted=True)
    assert bool((w[:, 1:] <= w[:, :-1]).all())


def test_ties_at_the_boundary_keep_the_lowest_ids():
    """Five experts share the 3rd-largest score and two slots are left: ids 1 and 4."""
    E, K = 12, 4
    x = torch.full((2, E), -1.0)
    x[:, 7] = 2.0
    x[:, [1, 4, 6, 9, 11]] = 0.5
    for w, ids in (ops.softmax_topk(x, K, False), ops.topk_softmax(x, K)):
        assert ids.tolist() == [[7, 1, 4, 6]] * 2
        assert torch.equal(w[:, 1], w[:, 2]) and torch.equal(w[:, 2], w[:, 3])


def test_nan_row_gives_sentinels_never_an_id_out_of_range():
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    x[1, 5] = float("nan")
    w, ids = ops.softmax_topk(x, 4, True)
    assert ids[1].tolist() == [-1] * 4 and bool((ids[[0, 2]] >= 0).all())
    assert bool((ids < 16).all())
    w_ref, ids_ref = naive.softmax_topk(x[[0, 2]], 4, True)
    assert torch.equal(ids[[0, 2]], ids_ref)


def test_strided_logits_and_no_tokens():
    big = torch.randn(9, 40, generator=torch.Generator().manual_seed(2))
    x = big[:, 4:36]  # a view: row stride 40
    w, ids = ops.softmax_topk(x, 3, True)
    w_ref, ids_ref = naive.softmax_topk(x.contiguous(), 3, True)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)
    w0, ids0 = ops.softmax_topk(x[:0], 3, True)
    assert w0.shape == (0, 3) and ids0.shape == (0, 3)
    with pytest.raises(ValueError, match="top_k=41"):
        ops.softmax_topk(big, 41, True)
