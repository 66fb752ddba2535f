"""Steps replayed from CUDA graphs, on one GPU and on every TP/EP layout; and the same padded
static step run uncaptured on any device, so that its logic is tested on a CPU.

Legend: P the padded step size in tokens (a bucket of :data:`~.config.GRAPH_BUCKETS`), Q its
sequences (``EngineConfig.graph_seqs(P)``: P, or the bucket above ``max_num_seqs`` when that is
smaller), M the block-table width of the longest allowed sequence, V vocab.

Why: an eager step launches every kernel from Python (tens per layer); a graph replays the
whole step (batch info, embedding, layers, final norm, LM head, sampling) in one launch.

What is static, and why it stays right:

- Inputs by address: one int64 buffer per bucket holds the step's token ids, positions, slot
  mapping, sequence offsets, kv lengths and adapter slots (padded to P tokens and Q
  sequences: padding tokens store no key, padding sequences have no keys and no adapter, see
  :mod:`.plan`), and one ``[Q, M]`` buffer the block tables (only the plan's first columns
  are copied; a column a sequence does not reach is never read). Two device copies per step
  fill them.
- The KV pages, the model weights and the LoRA pool's buffers are allocated once and written
  in place (pages by the step itself, slots by adapter loads): replays see the new contents,
  so adapters load, evict and replace with no recapture.
- The paged-attention grid depends on (T, B) = (P, Q) only; the loops over each sequence's
  keys read the lengths from device memory.
- Sampling reads its per-row parameters (temperature, seeds, steps, ...) from a static
  ``SamplingBatch`` filled with ``copy_into``; only the leader samples (the other ranks'
  graphs end at the final norm).

Graphs are keyed by ``(P, any adapter, any router LoRA, decode only, top log-probs, sampling
variant)``: a step without adapters leaves the LoRA path out entirely; a LoRA step runs the
router LoRA of every MoE layer while any resident adapter has one (zero on the slots and layers
without one, so later loads need no recapture) and none otherwise (adapters without a router
LoRA, the common case, pay nothing for it); a decode step uses the decode
attention tiles, a greedy-only step skips the samplers' thresholds and one without top-k /
top-p skips the sort of the logits. Every rank
of the TP group gets the key from the plan and from its pool, whose residents every rank
changes at the same step, so all capture (and warm up, which runs the collectives) at the
same step; NCCL collectives are captured inside the graph.

Prompt chunks of up to ``max_graph_tokens`` (2048) tokens are captured too: an eager step
issues every launch from Python, 1-2.6 ms of host time per layer on an H200 (``python -m
benchmarks launches``), more than the GPU time of a 512-token step, so an eager prompt step was
host-bound. The Q rows of such a graph (not P) go through the LM head and the sampler.

Not captured, and why: steps of more than ``max_graph_tokens`` tokens, the data-dependent
all-to-all dispatcher (``--dispatcher all_to_all`` or its reference; ``auto`` picks all-reduce
at graph sizes), and CPU devices.
"""

from __future__ import annotations

import logging
import time

import torch

from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.sampling import FULL, SamplingBatch, sample
from moelora_dist.lora.batch_info import build_batch_info
from moelora_dist.models.batch import ForwardBatch
from moelora_dist.moe.dispatch import auto_dispatcher_name

log = logging.getLogger(__name__)
GRAPH_SAFE_DISPATCHERS = ("all_reduce", "all_to_all_static", "all_to_all_fixed")
# Sampling variants a graph is captured for (the plan's graph_sampling): greedy rows only; no
# top-k / top-p (a row max); any filters (a full sort of the logits).
GREEDY, UNFILTERED, FILTERED = 0, 1, 2


def sampling_variant(batch: SamplingBatch) -> int:
    """The cheapest graph variant that samples ``batch`` exactly as :func:`sample` would."""
    if batch.all_greedy:
        return GREEDY
    return UNFILTERED if batch.filter_width == 0 else FILTERED


def static_sampling(P: int, variant: int, device) -> SamplingBatch:
    if variant == GREEDY:
        return SamplingBatch.empty(P, device, filter_width=0, all_greedy=True)
    return SamplingBatch.empty(P, device, filter_width=0 if variant == UNFILTERED else FULL)


def graph_safe(model, num_tokens: int) -> bool:
    """Whether every MoE layer's dispatcher at ``num_tokens`` tokens can be captured."""
    for layer in model.layers:
        moe = layer.get("moe")
        if moe is None:
            continue
        name = moe.dispatcher
        if name == "auto":
            name = auto_dispatcher_name(num_tokens, model.groups.ep_size)
        if name not in GRAPH_SAFE_DISPATCHERS:
            return False
    return True


class GraphRunner:
    """Padded static steps of one model over its KV pages (module docstring).

    ``capture``: record CUDA graphs (default: on a CUDA device); False runs the identical
    static step eagerly (the CPU test path). ``leader``: the rank that samples.
    """

    def __init__(self, model, cache, config: EngineConfig, max_model_len: int, leader: bool,
                 capture: bool | None = None):
        self.model, self.cache, self.leader, self.config = model, cache, leader, config
        self.capture = model.device.type == "cuda" if capture is None else capture
        if self.capture and model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use capture=False on a CPU")
        self.buckets = tuple(b for b in config.graph_buckets if graph_safe(model, b))
        self.width = config.pages_for(max_model_len)
        self._one_d: dict[int, torch.Tensor] = {}
        self._tables: dict[int, torch.Tensor] = {}
        self._sampling: dict[tuple[int, int], SamplingBatch] = {}
        self._graphs: dict[tuple, tuple] = {}
        self._router_paths = frozenset(model.router_paths())  # fixed: checked every step
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None

    @property
    def captured(self) -> list[tuple]:
        return sorted(self._graphs)

    def bucket_for(self, num_tokens: int) -> int:
        """The bucket P of a step of ``num_tokens`` tokens, 0 when it runs eagerly."""
        return next((b for b in self.buckets if b >= num_tokens), 0)

    def sampling_buffer(self, P: int, variant: int) -> SamplingBatch:
        if (P, variant) not in self._sampling:
            self._sampling[P, variant] = static_sampling(self.seqs_for(P), variant,
                                                         self.model.device)
        return self._sampling[P, variant]

    def seqs_for(self, P: int) -> int:
        """Q, the sequences of the graph of ``P`` tokens."""
        return self.config.graph_seqs(P)

    def _buffers(self, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        if P not in self._one_d:
            dev, Q = self.model.device, self.seqs_for(P)
            self._one_d[P] = torch.zeros(3 * P + 3 * Q + 1, dtype=torch.int64, device=dev)
            self._tables[P] = torch.zeros(Q, self.width, dtype=torch.int64, device=dev)
        return self._one_d[P], self._tables[P]

    def key(self, plan) -> tuple:
        """The graph ``plan`` replays: ``(P, any adapter, any router LoRA, decode only, top
        log-probs, sampling variant)`` (module docstring)."""
        lora = plan.num_lora_tokens > 0
        router = lora and self.model.pool.targets_any(self._router_paths)
        return (plan.graph_bucket, lora, router, plan.decode_only, plan.graph_logprobs,
                plan.graph_sampling)

    @torch.no_grad()
    def run(self, plan, sampling: SamplingBatch | None = None):
        """Execute ``plan`` (``plan.graph_bucket`` P > 0) from its graph.

        ``sampling``: the leader's Q-row parameters (copied into the static ones).
        Returns the leader's ``SampleOutput`` over the Q rows (static buffers, valid until
        the next replay of the same graph), None on the other ranks.
        """
        P = plan.graph_bucket
        one_d, tables = self._buffers(P)
        assert (plan.num_tokens, plan.num_seqs) == (P, self.seqs_for(P)) \
            and plan.width <= self.width, "plan does not fit the graph"
        one_d.copy_(plan.one_d)
        tables[:, : plan.width].copy_(plan.block_tables_BM)
        if self.leader:
            sampling.copy_into(self.sampling_buffer(P, plan.graph_sampling))
        key = self.key(plan)
        if not self.capture:
            return self._step(*key)
        # The model's GPU need not be the current device: streams, capture and replay on its.
        with torch.cuda.device(self.model.device):
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(key)
            entry[0].replay()
        return entry[1]

    def _step(self, P: int, lora: bool, router: bool, decode_only: bool, num_logprobs: int,
              variant: int):
        """The static step: no host sync, every shape fixed by the key."""
        model = self.model
        one_d, tables = self._buffers(P)
        Q = self.seqs_for(P)
        ids, pos, slot_map, seg, kv, slots = one_d.split([P, P, P, Q + 1, Q, Q])
        batch = ForwardBatch(pos, seg, kv, tables, slot_map, decode_only)
        info = build_batch_info(seg, slots, model.pool.slot_rank_S, backend=model.backend,
                                validate=False, num_tokens=P, num_lora_tokens=int(lora))
        hidden_PH = model.forward(ids, batch, self.cache, info, router_lora=router)
        if not self.leader:
            return None
        logits_PV = model.logits(hidden_PH[(seg[1:] - 1).clamp(min=0)])
        return sample(logits_PV, self.sampling_buffer(P, variant), num_logprobs,
                      backend=model.backend)

    def _capture(self, key: tuple) -> tuple:
        t0 = time.perf_counter()
        # Warm up on a side stream, as torch.cuda.graphs recommends: Triton compiles, the
        # dense factor cache fills, NCCL sets up. Running the step again is harmless: it
        # rewrites the same keys at the same slots and sampling is a function of its inputs.
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(*key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            out = self._step(*key)
        self._graphs[key] = (graph, out)
        if self.model.groups.is_rank0:
            log.info("graph captured: %d tokens, %s, %s, %d logprobs, %s sampling, %.0f ms; "
                     "%d graphs, %.0f MiB reserved", key[0],
                     ("base", "lora", "lora+router")[key[1] + key[2]],
                     "decode" if key[3] else "mixed", key[4],
                     ("greedy", "unfiltered", "filtered")[key[5]],
                     1e3 * (time.perf_counter() - t0),
                     len(self._graphs), torch.cuda.memory_reserved(self.model.device) / 2**20)
        return self._graphs[key]
