"""The sampling kernel family under the Triton interpreter: the counter-based uniforms are the
same bits in Triton, in PyTorch and in plain Python; the kernel's tokens, logprobs and
log-sum-exp match naive.sample_rows on edge inputs (strided logits, -inf entries, ties,
thresholds, fp16/bf16), with NaN-poisoned allocations so an unwritten output fails."""

import pytest
import torch

from moelora_dist.kernels.sampling import common, naive, ops
from moelora_dist.kernels.sampling.filters import filter_thresholds

SEEDS = [0, 1, -1, -(1 << 63), (1 << 63) - 1, 123456789012345, 0xDEADBEEF]  # int64 bit patterns


def test_uniforms_same_bits_in_triton_torch_and_python():
    V = 2 * common.CHUNK + 17  # three chunks, the last one partial
    seed = torch.tensor(SEEDS, dtype=torch.int64)
    step = torch.tensor([0, 1, 2, 1 << 20, 7, (1 << 32) + 5, 3], dtype=torch.int64)
    u_torch = naive.uniforms(seed, step, V)
    u_triton = ops.uniforms(seed, step, V)
    assert torch.equal(u_torch, u_triton)
    for b, (s, t) in enumerate(zip(SEEDS, step.tolist())):
        for i in (0, 1, 2047, 2048, V - 1):
            assert u_torch[b, i].item() == common.uniform(s, t, i), (s, t, i)
    assert float(u_torch.min()) > 0 and float(u_torch.max()) < 1
    # a step is taken mod 2**32 (documented), and a seed's high word matters
    assert torch.equal(u_torch[5], naive.uniforms(seed[5:6], torch.tensor([5]), V)[0])
    other_hi = naive.uniforms(torch.tensor([SEEDS[1] + (1 << 32)]), step[1:2], V)
    assert not torch.equal(u_torch[1], other_hi[0])


def test_uniforms_look_uniform_and_independent():
    """Coarse moments over 200,000 numbers: mean, variance, neighbour correlation, and the
    correlation between consecutive steps of one seed (a broken key schedule shows here)."""
    seed = torch.full((40,), 99, dtype=torch.int64)
    u = naive.uniforms(seed, torch.arange(40), 5000).double()
    assert abs(u.mean() - 0.5) < 3e-3 and abs(u.var() - 1 / 12) < 2e-3
    x = u - 0.5
    assert abs((x[:, 1:] * x[:, :-1]).mean() * 12) < 1e-2  # within a row
    assert abs((x[1:] * x[:-1]).mean() * 12) < 1e-2  # step to step


def _inputs(dtype, B=9, V=2 * common.CHUNK + 300, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    logits[0, 5:50] = float("-inf")  # masked vocabulary entries
    logits[1, :] = float("-inf")
    logits[1, 4000] = 1.0  # one finite entry, in the last chunk
    logits[2, 100] = logits[2, 2100] = 40.0  # a greedy tie across chunks: first index
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3, 0.5, 2.0, 0.0, 1.0, 0.9])[:B]
    min_p = torch.tensor([0.0, 0.1, 0.3, 0.0, 0.05, 0.0, 0.0, 1.0, 0.2])[:B]
    seeds = torch.tensor((SEEDS + [5, 6])[:B], dtype=torch.int64)
    steps = torch.arange(B, dtype=torch.int64) * 13
    return logits, temperature, min_p, seeds, steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [0, 64, "V"], ids=["no-filter", "top-k", "sort"])
def test_kernel_matches_naive(dtype, width, poisoned_allocations):
    logits, temperature, min_p, seeds, steps = _inputs(dtype)
    V = logits.shape[1]
    top_k = torch.tensor([0, 5, 0, 64, 1, 0, 3, 0, 10])
    top_p = torch.tensor([0.9, 1.0, 1.0, 0.5, 1.0, 0.95, 1.0, 1.0, 0.3])
    row_max, tau = filter_thresholds(logits, temperature, top_k, top_p,
                                     V if width == "V" else width)
    want = naive.sample_rows(logits, temperature, min_p, seeds, steps, row_max, tau)
    got = ops.sample_rows(logits, temperature, min_p, seeds, steps, row_max, tau)
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], atol=1e-5, rtol=1e-6)
    assert torch.allclose(got[2], want[2], atol=1e-5, rtol=1e-6)
    assert got[0][1] == 4000 and got[0][2] == 100
    assert want[0][7] == logits[7].float().argmax()  # min_p = 1 keeps the top token only


def test_kernel_reads_strided_logits_and_parameter_columns(poisoned_allocations):
    logits, temperature, min_p, seeds, steps = _inputs(torch.float32, B=6)
    wide = torch.full((6, logits.shape[1] * 2), float("nan"))
    wide[:, ::2] = logits  # a column stride of 2
    packed = torch.stack([temperature, min_p, temperature], 1)  # per-row values as columns
    ints = torch.stack([seeds, steps, seeds], 1)
    row_max = logits.amax(-1)
    want = naive.sample_rows(logits, temperature, min_p, seeds, steps, row_max)
    got = ops.sample_rows(wide[:, ::2], packed[:, 0], packed[:, 1], ints[:, 0], ints[:, 1],
                          row_max)
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], atol=1e-5, rtol=1e-6)


def test_kernel_argmax_is_torch_argmax_for_greedy_rows():
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 3, (16, 3000), generator=g).float()  # many ties
    z = torch.zeros(16)
    token, _, _ = ops.sample_rows(logits, z, z, torch.arange(16), torch.arange(16),
                                  logits.amax(-1))
    assert torch.equal(token, logits.argmax(-1))
