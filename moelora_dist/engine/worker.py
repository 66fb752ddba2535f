"""Executes one step plan on one rank: the forward's metadata, the model, the LM head, sampling.

Legend: T tokens, B sequences, N sampled sequences, V vocab.

Every rank of the TP group runs the same forward (its shards); only the leader computes
logits and samples, since the other ranks never need the tokens (the next plan carries them).
A plan with a graph bucket replays a CUDA graph (:mod:`.graphs`); any other runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moelora_dist.engine.graphs import GraphRunner
from moelora_dist.engine.plan import host_to_device
from moelora_dist.engine.sampling import SampleOutput, SamplingBatch, sample
from moelora_dist.lora.batch_info import build_batch_info
from moelora_dist.models.batch import ForwardBatch

LOGITS_SLICE = 1024  # rows of prompt logits materialized on the device at once


@dataclass
class StepResult:
    """The leader's view of one executed step: ``sampled`` (N rows, on the device) and the
    fp32 CPU logits of each requested token range."""

    sampled: SampleOutput | None = None
    logits: list[torch.Tensor] = field(default_factory=list)


class Worker:
    """The model, its KV pages and its graphs on one rank.

    Args:
        model: this rank's :class:`~moelora_dist.models.model.MoELoRAModel`.
        cache: its :class:`~moelora_dist.models.batch.PagedKVCache`.
        leader: whether this rank samples.
        graphs: a :class:`GraphRunner`, or None to run every step eagerly.
    """

    def __init__(self, model, cache, leader: bool, graphs: GraphRunner | None = None):
        self.model, self.cache, self.leader, self.graphs = model, cache, leader, graphs

    def graph_bucket(self, num_tokens: int) -> int:
        return self.graphs.bucket_for(num_tokens) if self.graphs is not None else 0

    @torch.no_grad()
    def execute(self, plan, sampling: SamplingBatch | None = None,
                sample_seqs: list[int] | None = None, sample_tokens: list[int] | None = None,
                num_logprobs: int = 0,
                logit_ranges: list[tuple[int, int]] | None = None) -> StepResult:
        """Run ``plan``.

        Leader arguments (ignored elsewhere): ``sample_seqs`` / ``sample_tokens``: the
        sequences that sample and the index of their last token in the step; ``sampling``:
        their parameters (P rows, one per sequence, for a graph step); ``logit_ranges``:
        token ranges ``[lo, hi)`` whose logits come back to the host (prompt logits).
        """
        if plan.graph_bucket:
            out = self.graphs.run(plan, sampling)
            if not self.leader or not sample_seqs:
                return StepResult()
            rows = host_to_device(sample_seqs, self.model.device)
            return StepResult(SampleOutput(out.token_ids_B[rows], out.logprob_B[rows],
                                           out.top_ids_BN[rows], out.top_logprobs_BN[rows]))
        model = self.model
        batch = ForwardBatch(plan.positions_T, plan.seg_indptr_B1, plan.kv_lens_B,
                             plan.block_tables_BM, plan.slot_mapping_T, plan.decode_only)
        info = build_batch_info(plan.seg_indptr_B1, plan.lora_slot_B, model.pool.slot_rank_S,
                                backend=model.backend, validate=False,
                                num_tokens=plan.num_tokens,
                                num_lora_tokens=plan.num_lora_tokens)
        hidden_TH = model.forward(plan.input_ids_T, batch, self.cache, info)
        if not self.leader:
            return StepResult()
        res = StepResult()
        if sample_tokens:
            rows = host_to_device(sample_tokens, model.device)
            res.sampled = sample(model.logits(hidden_TH[rows]), sampling, num_logprobs)
        for lo, hi in logit_ranges or []:
            # [n, V] fp32 is GBs at a 150k vocabulary for long prompts: slices.
            res.logits.append(torch.cat([model.logits(hidden_TH[s:min(hi, s + LOGITS_SLICE)])
                                         .cpu() for s in range(lo, hi, LOGITS_SLICE)]))
        return res
