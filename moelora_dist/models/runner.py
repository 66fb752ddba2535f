"""The model runner: a model, its adapters, and batches of requests that mix them.

    groups = init_parallel(tp, ep)                         # or ParallelGroups.single("cpu")
    runner = ModelRunner.from_pretrained(model_dir, groups, dtype=torch.float32)
    runner.add_adapter("math", "/ckpt/math-lora")          # PEFT directory
    logits = runner.prompt_logits([Request([1, 2, 3], "math"), Request([4, 5], None)])
    outs = runner.generate([Request([1, 2, 3], "math", max_new_tokens=8)])
    runner.remove_adapter("math")

Every rank of the job runs the same calls with the same requests (SPMD). With one TP group
(``world == tp``) every rank returns every result; with ``dp`` replicas each serves every
``dp``-th request and global rank 0 returns them all (:mod:`.dp`), the others their share.
Requests are grouped into forwards by a token budget and by the pool's slot count (a forward
may use at most ``max_loras`` distinct adapters). Adapters are held in a host-side registry and
moved into pool slots on demand (LRU), so more adapters than slots may be registered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from moelora_dist.lora.batch_info import build_batch_info
from moelora_dist.models.batch import ForwardBatch
from moelora_dist.config.model import ModelConfig
from moelora_dist.models.graphs import DecodeGraphs, bucket_for, graphs_supported
from moelora_dist.models.dp import gather_generations, gather_logits, replica_indices
from moelora_dist.models.model import MoELoRAModel
from moelora_dist.models.requests import Request, validate_requests
from moelora_dist.models.weights import CheckpointWeights
from moelora_dist.parallel.groups import ParallelGroups

log = logging.getLogger(__name__)
LOGITS_SLICE = 1024  # tokens whose logits are materialized on the device at once


@dataclass
class Generation:
    """Greedy output of one request: new token ids only, and why it stopped."""

    output_ids: list[int]
    finish_reason: str  # "length" | "eos"


class ModelRunner:
    """Serves one model with any number of registered adapters (see module docstring)."""

    def __init__(self, model: MoELoRAModel):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.registry: dict = {}
        # Made on the first graph decode (CUDA, one process); a test may set an uncaptured one.
        self.decode_graphs: DecodeGraphs | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str, groups: ParallelGroups | None = None, *,
                        dtype: torch.dtype = torch.float32, max_loras: int = 8,
                        max_rank: int = 64, dispatcher: str = "auto",
                        progress: bool = True, config: ModelConfig | None = None,
                        backend: str | None = None) -> "ModelRunner":
        """Load this rank's slices of a Hugging Face MoE model directory (``config``: its
        parsed ``config.json`` when the caller has read it already)."""
        groups = groups or ParallelGroups.single("cpu")
        cfg = config or ModelConfig.from_dir(model_dir)
        source = CheckpointWeights(model_dir, cfg, dtype)
        model = MoELoRAModel.build(cfg, groups, source, dtype=dtype, max_loras=max_loras,
                                   max_rank=max_rank, dispatcher=dispatcher, progress=progress,
                                   backend=backend)
        return cls(model)

    # -- adapters ----------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter, **load_kwargs):
        """Register an adapter: a PEFT directory (read and checked against the model here) or
        a :class:`~moelora_dist.adapters.CanonicalAdapter` already loaded.

        It is loaded into a pool slot right away when a slot is free, else when a batch needs
        it. ``load_kwargs`` go to :func:`moelora_dist.adapters.load_adapter`
        (``force_shared_outer``, ``strict``). Raises ``ValueError`` subclasses naming the fix.
        """
        from moelora_dist.adapters import CanonicalAdapter, load_adapter

        if name in self.registry:
            raise ValueError(f"an adapter named {name!r} is already registered; remove it first")
        pool = self.model.pool
        if not isinstance(adapter, CanonicalAdapter):
            adapter = load_adapter(adapter, model_config=self.cfg.raw,
                                   max_rank=pool.config.max_rank, name=name, **load_kwargs)
        elif adapter.name != name:
            raise ValueError(f"adapter object is named {adapter.name!r}, registered as {name!r}; "
                             "load it with name=... matching")
        unserved = sorted(set(adapter.dense) - set(pool.dense_specs))
        if unserved:
            raise ValueError(
                f"adapter {name!r} targets modules this runner does not serve: {unserved[:4]}; "
                "LoRA is served on the attention projections, the dense and shared-expert MLPs, "
                "the router and the experts (docs/families.md)")
        if len(pool.loaded()) < pool.config.max_loras:
            pool.load(adapter)  # validates it against every layer and module now
        self.registry[name] = adapter
        if self.model.groups.is_rank0:
            log.info("adapter %r: rank %d, %d MoE layers, %d dense modules (%s)", name,
                     adapter.max_rank, len(adapter.moe), len(adapter.dense), adapter.format)
        return adapter

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter and free its pool slot (zeroed)."""
        if name not in self.registry:
            raise ValueError(f"adapter {name!r} is not registered; registered: "
                             f"{sorted(self.registry)}")
        if self.model.pool.slot_of(name) is not None:
            self.model.pool.unload(name)
        del self.registry[name]

    @property
    def adapter_names(self) -> list[str]:
        return sorted(self.registry)

    # -- batching ----------------------------------------------------------------------------

    def _chunks(self, requests: list[Request], max_tokens: int, max_requests: int):
        """Consecutive groups of request indices within the token, request and slot budgets."""
        max_loras = self.model.pool.config.max_loras
        chunk, tokens, names = [], 0, set()
        for i, r in enumerate(requests):
            n = len(r.input_ids) + r.max_new_tokens
            new_names = names | ({r.adapter} if r.adapter else set())
            if chunk and (tokens + n > max_tokens or len(chunk) >= max_requests
                          or len(new_names) > max_loras):
                yield chunk
                chunk, tokens, new_names = [], 0, {r.adapter} if r.adapter else set()
            chunk.append(i)
            tokens += n
            names = new_names
        if chunk:
            yield chunk

    def _validate(self, requests: list[Request]) -> None:
        validate_requests(requests, vocab_size=self.cfg.vocab_size, adapters=self.registry,
                          max_len=self.cfg.max_positions)

    def _forward(self, input_ids: list[int], batch: ForwardBatch, cache, req_to_slot_B):
        dev = self.model.device
        info = build_batch_info(batch.seg_indptr_B1, req_to_slot_B, self.model.pool.slot_rank_S,
                                backend=self.model.backend)
        ids_T = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        return self.model.forward(ids_T, batch, cache, info)

    # -- public entry points -----------------------------------------------------------------

    @torch.no_grad()
    def prompt_logits(self, requests: list[Request], max_batch_tokens: int = 8192,
                      progress: bool = False) -> list[torch.Tensor]:
        """Logits of every prompt position: one ``[len(input_ids), V]`` float32 CPU tensor each."""
        self._validate(requests)
        out: list[torch.Tensor | None] = [None] * len(requests)
        pool, cfg = self.model.pool, self.cfg
        mine = replica_indices(self.model.groups, len(requests))
        chunks = list(self._chunks([Request(requests[i].input_ids, requests[i].adapter)
                                    for i in mine], max_batch_tokens, 1 << 30))
        for chunk in tqdm(chunks, desc="prefill", unit="batch", disable=not progress):
            idxs = [mine[j] for j in chunk]
            reqs = [requests[i] for i in idxs]
            lens = [len(r.input_ids) for r in reqs]
            batch = ForwardBatch.build(lens, [0] * len(reqs), self.model.device,
                                       sliding_window=cfg.sliding_window)
            cache = self.model.new_cache(len(reqs), max(lens))
            req_to_slot = pool.prepare_batch([r.adapter for r in reqs], self.registry)
            try:
                hidden = self._forward([t for r in reqs for t in r.input_ids], batch, cache,
                                       req_to_slot)
            finally:
                pool.release_batch()
            # [T, V] fp32 can be GBs at a 150k vocabulary: project and copy out in slices.
            logits = torch.cat([self.model.logits(hidden[s:s + LOGITS_SLICE]).cpu()
                                for s in range(0, hidden.shape[0], LOGITS_SLICE)])
            for i, part in zip(idxs, torch.split(logits, lens)):
                out[i] = part
        shapes = [(len(r.input_ids), cfg.vocab_size) for r in requests]
        return gather_logits(self.model.groups, out, shapes)  # type: ignore[return-value]

    @torch.no_grad()
    def generate(self, requests: list[Request], max_batch: int = 64,
                 max_batch_tokens: int = 8192, progress: bool = False,
                 cuda_graphs: bool = True) -> list[Generation]:
        """Greedy decoding; stops at ``max_new_tokens`` or an EOS id (unless ``ignore_eos``).

        ``cuda_graphs``: decode steps replay CUDA graphs (:mod:`.graphs`) on CUDA with one
        process and at most 256 requests per wave; False (or any other case) runs eagerly.
        """
        self._validate(requests)
        results: list[Generation | None] = [None] * len(requests)
        mine = replica_indices(self.model.groups, len(requests))
        todo = [i for i in mine if requests[i].max_new_tokens > 0]
        for i in mine:
            if requests[i].max_new_tokens == 0:
                results[i] = Generation([], "length")
        chunks = list(self._chunks([requests[i] for i in todo], 1 << 62, max_batch))
        for chunk in tqdm(chunks, desc="generate", unit="batch", disable=not progress):
            wave = [todo[j] for j in chunk]
            for i, gen in zip(wave, self._generate_wave([requests[i] for i in wave],
                                                        max_batch_tokens, cuda_graphs)):
                results[i] = gen
        return gather_generations(self.model.groups, results, Generation)  # type: ignore

    def _decode_graphs(self, num_rows: int) -> DecodeGraphs | None:
        if bucket_for(num_rows) is None:
            return None
        if self.decode_graphs is None and graphs_supported(self.model):
            self.decode_graphs = DecodeGraphs(self.model)
        return self.decode_graphs

    def _generate_wave(self, reqs: list[Request], max_batch_tokens: int,
                       cuda_graphs: bool) -> list[Generation]:
        pool, cfg, dev = self.model.pool, self.cfg, self.model.device
        B = len(reqs)
        prompt_lens = [len(r.input_ids) for r in reqs]
        max_len = max(p + r.max_new_tokens for p, r in zip(prompt_lens, reqs))
        graphs = self._decode_graphs(B) if cuda_graphs else None
        cache = graphs.cache_for(B, max_len) if graphs else self.model.new_cache(B, max_len)
        eos = set(cfg.eos_token_ids)
        outs: list[list[int]] = [[] for _ in reqs]
        reasons = ["length"] * B
        req_to_slot = pool.prepare_batch([r.adapter for r in reqs], self.registry)
        try:
            # Prefill by token budget (the KV cache rows are the wave's), then decode all.
            last_hidden = []
            prefill = [Request(r.input_ids) for r in reqs]
            for rows in self._chunks(prefill, max_batch_tokens, 1 << 30):
                batch = ForwardBatch.build([prompt_lens[b] for b in rows], [0] * len(rows), dev,
                                           cache_rows=rows, sliding_window=cfg.sliding_window)
                idx = torch.tensor(rows, dtype=torch.int64, device=req_to_slot.device)
                hidden = self._forward([t for b in rows for t in reqs[b].input_ids], batch,
                                       cache, req_to_slot[idx])
                last_hidden.append(hidden[batch.last_token_index_B])
            # [B, H]: one row per request
            next_ids = self._pick(self.model.logits(torch.cat(last_hidden)))
            slots = req_to_slot.tolist()
            active = list(range(B))
            while True:
                still = []
                for b, tok in zip(active, next_ids):
                    outs[b].append(tok)
                    if tok in eos and not reqs[b].ignore_eos:
                        reasons[b] = "eos"
                    elif len(outs[b]) < reqs[b].max_new_tokens:
                        still.append(b)
                active = still
                if not active:
                    break
                if graphs is not None:
                    next_ids = self._graph_step(graphs, active, outs, prompt_lens, slots)
                    continue
                batch = ForwardBatch.build(
                    [1] * len(active), [prompt_lens[b] + len(outs[b]) - 1 for b in active], dev,
                    cache_rows=active, sliding_window=cfg.sliding_window)
                idx = torch.tensor(active, dtype=torch.int64, device=req_to_slot.device)
                hidden = self._forward([outs[b][-1] for b in active], batch, cache,
                                       req_to_slot[idx])
                next_ids = self._pick(self.model.logits(hidden))
        finally:
            pool.release_batch()
        return [Generation(o, r) for o, r in zip(outs, reasons)]

    @staticmethod
    def _graph_step(graphs: DecodeGraphs, active: list[int], outs: list[list[int]],
                    prompt_lens: list[int], slots: list[int]) -> list[int]:
        """One decode step of the live requests ``active`` (ascending; request b is cache row
        b) through :class:`DecodeGraphs`; finished rows below the last live one are padding."""
        n = active[-1] + 1
        ids, pos, row_slots = [0] * n, [-1] * n, [-1] * n
        for b in active:
            ids[b], pos[b], row_slots[b] = outs[b][-1], prompt_lens[b] + len(outs[b]) - 1, slots[b]
        _, next_B = graphs.step(ids, pos, row_slots)
        got = next_B.tolist()
        return [got[b] for b in active]

    def _pick(self, logits_BV: torch.Tensor) -> list[int]:
        """Greedy token of each row, made identical on every rank of the TP group.

        The ranks compute the same logits, but a tie broken differently on one rank would make
        the ranks run different batches and hang; rank 0 of the group decides for all.
        """
        ids = torch.argmax(logits_BV, dim=-1)
        group = self.model.groups.tp_group
        if group is not None and dist.get_world_size(group) > 1:
            dist.broadcast(ids, src=dist.get_process_group_ranks(group)[0], group=group)
        return ids.tolist()
