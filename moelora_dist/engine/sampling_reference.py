"""The reference of :func:`moelora_dist.engine.sampling.sample`, one row at a time, with the
filters written as Hugging Face's logits warpers do them (masks in float64 over the whole
vocabulary, sorts where they sort; ties at top-p's cut are kept, see :func:`kept_mask`) and the
same uniforms.

    out = sample_reference(logits_BV, params, seeds, steps, num_logprobs)

It shares only the random numbers with the fast path (``kernels/sampling/naive.uniforms``)
and the final expression ``l + T g`` (fp32), so a token differs only where a filter's cut
differs -- which needs two probabilities within float rounding of each other.

Legend: B rows, V vocabulary, N top-n logprobs.
"""

from __future__ import annotations

import torch

from moelora_dist.engine.sampling import SampleOutput
from moelora_dist.engine.sampling_params import SamplingParams
from moelora_dist.kernels.sampling.naive import gumbel, uniforms


def kept_mask(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[V]`` bool: the tokens ``params`` may sample (all of them for a greedy request).
    Temperature, then top-k, top-p, min-p, each on the survivors of the previous one."""
    V = logits_V.shape[0]
    if params.greedy:
        return torch.ones(V, dtype=torch.bool, device=logits_V.device)
    s = logits_V.double() / params.temperature
    if params.top_k > 0:  # TopKLogitsWarper: below the k-th largest goes
        kth = torch.topk(s, min(params.top_k, V)).values[-1]
        s = s.masked_fill(s < kth, float("-inf"))
    if params.top_p < 1:  # TopPLogitsWarper: ascending cumulative mass <= 1 - top_p goes
        sorted_s, order = torch.sort(s, descending=False)
        cum = sorted_s.softmax(-1).cumsum(-1)
        remove = cum <= 1 - params.top_p
        remove[-1] = False  # the most likely token always stays
        # One deviation from Hugging Face, as in the fast path: a token tied with the
        # smallest kept one stays (which of equal logits a sort puts first is arbitrary)
        remove &= sorted_s < sorted_s[~remove].min()
        s = s.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    if params.min_p > 0:  # MinPLogitsWarper: below min_p times the top probability goes
        probs = s.softmax(-1)
        s = s.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return torch.isfinite(s)


def sample_reference(logits_BV: torch.Tensor, params: list[SamplingParams], seeds: list[int],
                     steps: list[int], num_logprobs: int = 0) -> SampleOutput:
    """Row by row: greedy rows take ``argmax`` of the logits; the others
    ``argmax(l + T g)`` over :func:`kept_mask` with the uniforms of ``(seeds[b], steps[b])``.
    Logprobs: float64 ``log_softmax`` of the unmodified logits, returned as fp32."""
    B, V = logits_BV.shape
    dev = logits_BV.device
    tokens, chosen, top_ids, top_lps = [], [], [], []
    for b in range(B):
        l32 = logits_BV[b].float()
        p = params[b]
        if p.greedy:
            tok = int(torch.argmax(l32))
        else:
            seed = torch.tensor([seeds[b]], dtype=torch.int64, device=dev) if seeds[b] < 1 << 63 \
                else torch.tensor([seeds[b] - (1 << 64)], dtype=torch.int64, device=dev)
            step = torch.tensor([steps[b]], dtype=torch.int64, device=dev)
            g = gumbel(uniforms(seed, step, V))[0]
            score = torch.where(kept_mask(logits_BV[b], p), l32 + p.temperature * g,
                                float("-inf"))
            tok = int(torch.argmax(score))
        logp = torch.log_softmax(logits_BV[b].double(), -1)
        tokens.append(tok)
        chosen.append(float(logp[tok]))
        order = torch.argsort(logp, descending=True)[:num_logprobs]
        top_ids.append(order.tolist())
        top_lps.append(logp[order].tolist())
    return SampleOutput(
        torch.tensor(tokens, dtype=torch.int64, device=dev),
        torch.tensor(chosen, dtype=torch.float32, device=dev),
        torch.tensor(top_ids, dtype=torch.int64, device=dev).reshape(B, num_logprobs),
        torch.tensor(top_lps, dtype=torch.float32, device=dev).reshape(B, num_logprobs))
