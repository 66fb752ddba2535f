"""Decode steps replayed from CUDA graphs (one process, one GPU), and the same padded static
step run uncaptured on any device so that its logic is unit-tested on a CPU.

Legend: B live cache rows of this step, P the padded batch (a bucket), L the KV-cache capacity,
V vocab, S pool slots.

Why: an eager decode step of the 4-layer Qwen3-30B-A3B-shaped model launches ~330 kernels
from Python and takes 14-24 ms of host time for 2.7-3.4 ms of GPU time. A graph replays the
whole step (embedding, layers, final norm, LM head, argmax) in one launch.

How the step is made static:

- Batch slot ``j`` is KV-cache row ``j``. The batch is padded to the smallest bucket of
  :data:`BUCKETS` holding every live row; rows without a request (padding, finished requests)
  take token 0 at position 0 with slot ``-1``: they write their own row's key 0 and attend to
  that one key, so nothing is NaN and no live row is touched.
- Attention reads the whole cache length ``L`` (:meth:`ForwardBatch.static_decode`); the mask,
  computed on the device from the positions, hides the keys a request does not have yet.
- Token ids, positions and slots live in one static ``[3, P]`` int64 device buffer per bucket,
  filled by one host-to-device copy per step; the batch info (per-token slots,
  ``slot_enabled_S``) comes from the one builder, :func:`build_batch_info`, run inside the
  graph against the pool's live ``slot_rank_S``.
- Two graphs per bucket: "base" (no request has an adapter: the LoRA path is not in the graph
  at all) and "lora". Which one runs is decided on the host from the request slots, as
  ``BatchInfo.num_lora_tokens`` decides in eager mode. Graphs are captured lazily, on the first
  step of a bucket and kind, after an uncaptured warm-up (Triton compilation, factor caches),
  into one memory pool shared by all of them.

What a graph holds by address, and why it stays right: the model weights; the pool's MoE and
dense buffers, which loading/evicting writes in place (the LoRA kernels read them directly);
and the KV cache, which this object owns: a cache of another shape drops every graph. Outputs (logits, ids) are static buffers, valid until the next step of the same bucket.
"""

from __future__ import annotations

import logging
import time

import torch

from moelora_dist.lora.batch_info import build_batch_info
from moelora_dist.models.batch import ForwardBatch, KVCache

log = logging.getLogger(__name__)
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_CAPACITY = 64  # KV-cache lengths are powers of two from here, so waves can share a cache


def bucket_for(num_rows: int) -> int | None:
    """The padded batch size for ``num_rows`` cache rows, or None beyond the largest bucket."""
    return next((b for b in BUCKETS if b >= num_rows), None)


def capacity_for(max_len: int) -> int:
    """KV-cache length for sequences of up to ``max_len`` tokens: the next power of two."""
    return max(MIN_CAPACITY, 1 << (max_len - 1).bit_length())


def graphs_supported(model) -> bool:
    """CUDA graphs are used on CUDA with a world of one process. Multi-GPU layouts run eagerly:
    their collectives inside a capture are not tested here."""
    return model.device.type == "cuda" and model.groups.layout.world_size == 1


class DecodeGraphs:
    """Padded static decode steps of one model, captured as CUDA graphs when ``capture``.

    ``capture=None`` captures when :func:`graphs_supported`; ``capture=False`` runs the same
    static step eagerly (the CPU test path). Use: ``cache = graphs.cache_for(B, max_len)``,
    prefill into rows ``0..B-1`` of it eagerly, then call :meth:`step` once per token.
    """

    def __init__(self, model, capture: bool | None = None):
        if capture is None:
            capture = graphs_supported(model)
        if capture and not graphs_supported(model):
            raise ValueError("CUDA graph decode needs a CUDA device and a world of 1 process; "
                             "run this model eagerly")
        self.model, self.capture = model, capture
        self.cache: KVCache | None = None
        self._inputs: dict[int, torch.Tensor] = {}  # P -> [3, P] int64: ids, positions, slots
        self._graphs: dict[tuple[int, bool], tuple] = {}  # (P, lora) -> (graph, logits, ids)
        self._mempool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def captured(self) -> list[tuple[int, bool]]:
        """``(bucket, lora)`` of every graph captured for the current cache."""
        return sorted(self._graphs)

    def cache_for(self, num_rows: int, max_len: int) -> KVCache:
        """A KV cache with at least ``bucket_for(num_rows)`` rows and length
        :func:`capacity_for` ``(max_len)``. The current one is kept when it fits, so its graphs
        stay valid; a new one drops every graph (they hold the old cache's addresses)."""
        rows, length = bucket_for(num_rows), capacity_for(max_len)
        if rows is None:
            raise ValueError(f"{num_rows} rows exceed the largest decode graph bucket "
                             f"{BUCKETS[-1]}; decode this batch eagerly")
        c = self.cache
        if c is None or c.num_rows < rows or c.max_len != length:
            self._graphs.clear()
            if self.capture:  # the old pool died with its last graph; it cannot be reused
                self._mempool = torch.cuda.graph_pool_handle()
            self.cache = None  # free the old cache before allocating the new one
            self.cache = self.model.new_cache(rows, length)
        return self.cache

    @torch.no_grad()
    def step(self, ids: list[int], positions: list[int], slots: list[int]):
        """Decode one token for cache rows ``0..B-1``.

        Args:
            ids, positions, slots: per row, the input token, its position and the adapter slot
                (``-1``: none). A row with ``positions[j] < 0`` has no request (finished).
        Returns:
            ``logits_BV`` fp32 and ``next_ids_B`` int64 (greedy) on the device: views of static
            buffers, overwritten by the next step of the same bucket.
        """
        B, cache = len(ids), self.cache
        if cache is None:
            raise ValueError("call cache_for() and prefill the cache before step()")
        P = bucket_for(B)
        if P is None or P > cache.num_rows or not (len(positions) == len(slots) == B):
            raise ValueError(f"step() takes one id, position and slot per cache row, at most "
                             f"{cache.num_rows} rows; got {B}, {len(positions)}, {len(slots)}")
        host = torch.zeros(3, P, dtype=torch.int64)
        host[2] = -1
        live = [j for j in range(B) if positions[j] >= 0]
        if any(positions[j] >= cache.max_len for j in live):
            raise ValueError(f"a position reaches the KV cache length {cache.max_len}")
        S, V = self.model.pool.config.max_loras, self.model.cfg.vocab_size
        if any(not -1 <= slots[j] < S or not 0 <= ids[j] < V for j in live):
            raise ValueError(f"slots must lie in [-1, {S}) and token ids in [0, {V})")
        host[0, live] = torch.tensor([ids[j] for j in live], dtype=torch.int64)
        host[1, live] = torch.tensor([positions[j] for j in live], dtype=torch.int64)
        host[2, live] = torch.tensor([slots[j] for j in live], dtype=torch.int64)
        inputs = self._inputs.get(P)
        if inputs is None:
            inputs = self._inputs[P] = torch.empty(3, P, dtype=torch.int64,
                                                   device=self.model.device)
        inputs.copy_(host)
        num_lora = sum(1 for j in live if slots[j] >= 0)
        if not self.capture:
            logits, next_ids = self._forward(inputs, num_lora)
        else:
            # The model's GPU need not be the current device (a process may hold several):
            # streams, capture and replay must all be on the model's.
            with torch.cuda.device(self.model.device):
                entry = self._graphs.get(self._key(P, num_lora))
                if entry is None:
                    entry = self._capture(inputs, num_lora)
                entry[0].replay()
            logits, next_ids = entry[1], entry[2]
        return logits[:B], next_ids[:B]

    def _key(self, P: int, num_lora: int) -> tuple:
        """A graph per bucket and kind; a LoRA graph also per model LoRA variant (which
        router LoRAs run), so loading an adapter with a router LoRA never replays a graph
        captured without it."""
        variant = self.model.lora_variant() if num_lora else ()
        return (P, num_lora > 0) + ((variant,) if variant else ())

    def _forward(self, inputs_3P: torch.Tensor, num_lora: int):
        """The static step; no host sync, every shape fixed by ``P`` and the cache."""
        model, cache = self.model, self.cache
        ids_P, pos_P, slot_P = inputs_3P[0], inputs_3P[1], inputs_3P[2]
        P = int(ids_P.shape[0])
        batch = ForwardBatch.static_decode(pos_P, cache.max_len, model.cfg.sliding_window)
        # One token per row. Only ``num_lora_tokens == 0`` changes what runs (the LoRA path
        # is left out); a graph captured with a positive count serves any other one.
        seg_P1 = torch.arange(P + 1, dtype=torch.int32, device=ids_P.device)
        info = build_batch_info(seg_P1, slot_P, model.pool.slot_rank_S, backend=model.backend,
                                validate=False, num_tokens=P, num_lora_tokens=num_lora)
        hidden_PH = model.forward(ids_P, batch, cache, info)
        logits_PV = model.logits(hidden_PH)
        return logits_PV, torch.argmax(logits_PV, dim=-1)

    def _capture(self, inputs_3P: torch.Tensor, num_lora: int) -> tuple:
        P = int(inputs_3P.shape[1])
        t0 = time.perf_counter()
        # Warm up on a side stream, as torch.cuda.graphs recommends: Triton compiles and tunes,
        # and the dense factor cache is filled outside the graph's pool. Running the step
        # twice is harmless: it rewrites the same keys at the same positions.
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(inputs_3P, num_lora)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            logits, next_ids = self._forward(inputs_3P, num_lora)
        entry = (graph, logits, next_ids)
        self._graphs[self._key(P, num_lora)] = entry
        if self.model.groups.is_rank0:
            log.info("decode graph captured: batch bucket %d, %s, KV length %d, %.0f ms; "
                     "%d graphs, %.0f MiB reserved on the device", P,
                     "lora" if num_lora else "base", self.cache.max_len,
                     1e3 * (time.perf_counter() - t0), len(self._graphs),
                     torch.cuda.memory_reserved(self.model.device) / 2**20)
        return entry
