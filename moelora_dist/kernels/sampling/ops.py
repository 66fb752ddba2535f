"""Host glue of the sampling family: the Triton path of :func:`.naive.sample_rows`.

Pipeline of one call: ``_sample_chunk_kernel`` over a ``(B, ceil(V / CHUNK))`` grid reads the
logits once (any float dtype, any strides), then ``_sample_combine_kernel`` over ``(B,)``
reduces the chunks. Two launches, no host sync, every shape fixed by ``B`` and ``V``: a CUDA
graph captures it. The chunk size is a constant, so the order of every reduction of a row is
the same whatever else is in the batch.

Legend: B rows, V vocabulary, C chunks.
"""

from __future__ import annotations

import torch
import triton

from moelora_dist.kernels.sampling.common import CHUNK
from moelora_dist.kernels.sampling.kernel import (_sample_chunk_kernel, _sample_combine_kernel,
                                                  _uniforms_kernel)


def sample_rows(logits_BV: torch.Tensor, temperature_B: torch.Tensor, min_p_B: torch.Tensor,
                seed_B: torch.Tensor, step_B: torch.Tensor, row_max_B: torch.Tensor,
                tau_B: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`moelora_dist.kernels.sampling.naive.sample_rows` (same arguments, same
    results: ``token_B`` int64, ``logprob_B`` fp32, ``lse_B`` fp32). The per-row tensors may
    be strided views (columns of one packed tensor)."""
    B, V = logits_BV.shape
    dev = logits_BV.device
    token = torch.empty(B, dtype=torch.int64, device=dev)
    logprob = torch.empty(B, dtype=torch.float32, device=dev)
    lse = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return token, logprob, lse
    C = triton.cdiv(V, CHUNK)
    best_BC = torch.empty(B, C, dtype=torch.float32, device=dev)
    best_idx_BC = torch.empty(B, C, dtype=torch.int64, device=dev)
    part_max_BC = torch.empty(B, C, dtype=torch.float32, device=dev)
    part_sum_BC = torch.empty(B, C, dtype=torch.float32, device=dev)
    tau = tau_B if tau_B is not None else row_max_B  # any tensor: not read without HAS_TAU
    _sample_chunk_kernel[(B, C)](
        logits_BV, temperature_B, min_p_B, seed_B, step_B, row_max_B, tau,
        best_BC, best_idx_BC, part_max_BC, part_sum_BC, V, C,
        logits_BV.stride(0), logits_BV.stride(1), temperature_B.stride(0), min_p_B.stride(0),
        seed_B.stride(0), step_B.stride(0), row_max_B.stride(0), tau.stride(0),
        HAS_TAU=tau_B is not None, CHUNK=CHUNK, num_warps=4)
    _sample_combine_kernel[(B,)](
        logits_BV, best_BC, best_idx_BC, part_max_BC, part_sum_BC, token, logprob, lse, C,
        logits_BV.stride(0), logits_BV.stride(1), BLOCK_C=triton.next_power_of_2(C),
        num_warps=1 if C <= 128 else 4)
    return token, logprob, lse


def uniforms(seed_B: torch.Tensor, step_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """See :func:`moelora_dist.kernels.sampling.naive.uniforms`: the same fp32 bits."""
    B = seed_B.shape[0]
    out = torch.empty(B, vocab, dtype=torch.float32, device=seed_B.device)
    if B:
        _uniforms_kernel[(B, triton.cdiv(vocab, CHUNK))](
            seed_B, step_B, out, vocab, seed_B.stride(0), step_B.stride(0), out.stride(0),
            CHUNK=CHUNK)
    return out
