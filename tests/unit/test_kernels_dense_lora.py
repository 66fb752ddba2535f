"""The dense-LoRA kernel family (Triton interpreter) against its reference and a token loop.

fp32 and fp16 (bf16 dots are wrong under the interpreter; bf16 runs in tests/gpu). The shrink
stays fp32 into the expand; into an fp32 output both paths differ by summation order only.
"""

import pytest
import torch

from moelora_dist.kernels.dense_lora import naive, ops
from moelora_dist.testing.references import dense_lora_token_loop

pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _case(T, S=4, R=16, I=40, outs=(24, 8, 8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    slot_T = torch.randint(-1, S, (T,), generator=g).to(torch.int32)
    rank = torch.tensor([R, R // 2, 0, R][:S], dtype=torch.int32)
    x = torch.randn(T, I, generator=g).to(dtype)
    a = [torch.randn(S, R, I, generator=g).to(dtype) * 0.2 for _ in outs]
    b = [torch.randn(S, o, R, generator=g).to(dtype) * 0.2 for o in outs]
    for t in a:  # rows past a slot's rank are zero, as the pool writes them
        for s_, r in enumerate(rank.tolist()):
            t[s_, r:] = 0
    return slot_T, rank, x, a, b


@pytest.mark.parametrize("T", [1, 7, 70], ids=["T1", "T7", "T70"])
@pytest.mark.parametrize("n", [1, 3], ids=["one_module", "qkv_group"])
def test_kernels_match_reference_and_token_loop(T, n):
    slot_T, rank, x, a, b = _case(T)
    a, b = a[:n], b[:n]
    ys = [torch.randn(T, t.shape[1]) for t in b]
    want = [y.clone() for y in ys]
    got = [y.clone() for y in ys]
    naive.add_dense_lora(want, x, a, b, slot_T, rank)
    ops.add_dense_lora(got, x, a, b, slot_T, rank)
    eff = torch.where((slot_T >= 0) & (rank[slot_T.clamp(min=0).long()] > 0), slot_T, -1)
    for y0, g_, w_, aj, bj in zip(ys, got, want, a, b):
        torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w_ - y0, dense_lora_token_loop(x, aj, bj, eff), atol=1e-5,
                                   rtol=1e-5)
        assert torch.equal(g_[eff < 0], y0[eff < 0])  # no adapter: the base output untouched


def test_strided_b_and_fp16_output():
    """A replicated kv module hands a row slice of b (strided); an fp16 y is updated in fp32
    and rounded once."""
    slot_T, rank, x, a, b = _case(9, dtype=torch.float16)
    rows = slice(2, 6)
    y = torch.zeros(9, 4, dtype=torch.float16)
    ops.add_dense_lora([y], x, a[:1], [b[0][:, rows]], slot_T, rank)
    eff = torch.where((slot_T >= 0) & (rank[slot_T.clamp(min=0).long()] > 0), slot_T, -1)
    want = dense_lora_token_loop(x, a[0], b[0], eff)[:, rows]
    torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=2e-2)


def test_the_delta_is_really_added():
    slot_T, rank, x, a, b = _case(12, seed=4)
    y = torch.zeros(12, 24)
    ops.add_dense_lora([y], x, a[:1], b[:1], slot_T, rank)
    has = (slot_T >= 0) & (rank[slot_T.clamp(min=0).long()] > 0)
    assert has.any() and (y[has].abs().amax(dim=1) > 1e-3).all()


@pytest.mark.parametrize("split_k", [None, 3, 7, 10], ids=["auto", "s3", "s7", "s10"])
def test_split_shrink_matches_reference(split_k):
    """The shrink's input features split over several programs per block (partials summed
    by the expand, in order) give the unsplit result; 600 features are 10 K tiles, so 3 and 7
    leave a short last chunk and 10 one tile each."""
    slot_T, rank, x, a, b = _case(70, I=600, seed=3)
    ys = [torch.randn(70, t.shape[1]) for t in b]
    want = [y.clone() for y in ys]
    got = [y.clone() for y in ys]
    naive.add_dense_lora(want, x, a, b, slot_T, rank)
    ops.add_dense_lora(got, x, a, b, slot_T, rank, split_k=split_k)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, atol=1e-4, rtol=1e-4)


def test_shrink_split_fills_the_gpu_at_decode_only():
    """Decode-sized plans (a few blocks) split K up to two programs per SM, keeping at least
    four K tiles per program; prefill-sized plans (hundreds of blocks) do not split."""
    assert ops.shrink_split(12, 2048, 132) == 8  # 32 K tiles, 4 per program
    assert ops.shrink_split(12, 4096, 132) == 16
    assert ops.shrink_split(9, 2048, 132) == 8
    assert ops.shrink_split(264, 2048, 132) == 1
    assert ops.shrink_split(40, 4096, 132) == 7
    assert ops.shrink_split(12, 40, 132) == 1  # one K tile


class _Pool:
    """What :class:`DenseLoRA` reads of a pool: ``dense_buffers(path)`` and ``slot_rank_S``."""

    def __init__(self, a, b, rank):
        from types import SimpleNamespace

        self.bufs = {f"m{j}": SimpleNamespace(a=aj, b=bj) for j, (aj, bj) in enumerate(zip(a, b))}
        self.slot_rank_S = rank

    def dense_buffers(self, path):
        return self.bufs[path]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_begin_before_the_base_outputs_then_finish(backend):
    """``DenseLoRA.begin`` starts a group's LoRA from ``x`` alone (the shrink; on CUDA beside
    the base GEMMs on a side stream), ``finish`` adds the deltas into base outputs made after
    it: the same as ``apply_group`` on outputs made before, for a group of five modules (two
    launches of up to three), a strided ``b`` among them; a wrong number of outputs is refused."""
    from types import SimpleNamespace

    from moelora_dist.models.lora_linear import DenseLoRA

    slot_T, rank, x, a, b = _case(21, outs=(24, 8, 8, 16, 12), seed=6)
    pool = _Pool(a, b, rank)
    info = SimpleNamespace(token_slot_T=slot_T, slot_enabled_S=rank > 0)
    mods = [(f"m{j}", slice(1, 5) if j == 2 else None) for j in range(5)]
    base = [torch.randn(21, 4 if j == 2 else t.shape[1]) for j, t in enumerate(b)]
    want = [y.clone() for y in base]
    naive.add_dense_lora(want, x, a, [bj[:, r] if r else bj for bj, (_, r) in zip(b, mods)],
                         slot_T, rank)
    lora = DenseLoRA(pool, info, backend)
    pending = lora.begin(x, mods)
    got = pending.finish([y.clone() for y in base])
    before = lora.apply_group(x, [(y.clone(), p, r) for y, (p, r) in zip(base, mods)])
    for g_, bf, w_ in zip(got, before, want):
        torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-5)
        assert torch.equal(g_, bf)
    with pytest.raises(ValueError, match="4 outputs for a group of 5"):
        lora.begin(x, mods).finish(base[:4])
