"""The engine a user holds: a model, its adapters, a scheduler over paged KV, and one loop.

    engine = Engine.from_pretrained(model_dir, adapters={"math": "/ckpt/lora-math"},
                                    dtype="bfloat16", max_num_seqs=64)
    outs = engine.generate([[1, 2, 3], "Hello"], SamplingParams(max_tokens=32, temperature=0),
                           adapter=["math", None])
    for delta in engine.stream(prompts, params): ...          # incremental RequestOutputs

    # a server drives the loop itself (one thread or one asyncio task):
    engine.add_request("r1", prompt, params, adapter="math")
    while engine.has_unfinished():
        for out in engine.step(): ...                          # new tokens, text, logprobs
    engine.abort("r1"); engine.metrics()

Ranks: under ``torchrun`` every rank builds the same engine. The *leader* of each
data-parallel replica (its TP rank 0) runs the scheduler: its ``add_request`` / ``step`` /
``add_adapter`` take effect, and each step's plan is broadcast to its TP group, whose other
ranks run :meth:`follow` (they only execute plans; their own ``add_adapter`` calls are no-ops,
the leader's plan carries the adapter). :meth:`generate`, :meth:`stream` and
:meth:`prompt_logits` are collective: call them on every rank with the same arguments; replica
``d`` serves every ``dp``-th request, and global rank 0 returns every result (the others their
share, None elsewhere). A rank that fails ends the job (the launcher's guarantee).
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from moelora_dist.engine import gather
from moelora_dist.engine.adapter_ops import AdapterManager, send
from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.graphs import GraphRunner
from moelora_dist.engine.sampling import SamplingParams, request_seed
from moelora_dist.engine.text import StopMatcher, TextCodec, TextError
from moelora_dist.engine.memory import plan_pages
from moelora_dist.engine.outputs import AdapterCounts, Completion, EngineMetrics
from moelora_dist.engine.pages import PageAllocator
from moelora_dist.engine.plan import recv_plan, send_idle, send_stop
from moelora_dist.engine.prompts import RequestError, check_request, prompt_ids
from moelora_dist.engine.scheduler import Scheduler
from moelora_dist.engine.sequence import Sequence, Status
from moelora_dist.engine.step import complete_step, drop_pending, launch_step
from moelora_dist.engine.worker import Worker
from moelora_dist.errors import OptionError

log = logging.getLogger(__name__)
# False: every step is read back before the next is planned, whatever the config says
# (A/B runs: benchmarks/device/with_constants.py).
ASYNC_STEPS = True


def load_codec(model_dir: str):
    """``(TextCodec or None, the TextError that kept one from loading or None)``: a model
    directory with a tokenizer but no ``text`` extra still serves token ids."""
    try:
        return TextCodec.from_model_dir(model_dir), None
    except TextError as exc:
        return None, exc


class Engine:
    """Serves one model with its adapters (module docstring). Build with :meth:`from_pretrained`
    or from a built model; ``capture``: force CUDA-graph capture on/off (None: on CUDA unless
    ``config.enforce_eager``; False runs the graphs' static steps uncaptured, for tests)."""

    def __init__(self, model, config: EngineConfig | None = None, codec=None,
                 capture: bool | None = None, codec_error: Exception | None = None):
        config = config or EngineConfig()
        config.validate()
        self.model, self.config, self.codec = model, config, codec
        self.codec_error = codec_error  # why a tokenizer present could not load (said on use)
        self.cfg = model.cfg
        groups = self.groups = model.groups
        self.max_model_len = config.max_model_len or model.max_positions
        if self.max_model_len > model.max_positions:
            raise OptionError(f"--max-model-len {self.max_model_len} exceeds the model's "
                              f"{model.max_positions} positions")
        self.is_leader = groups.rank_layout.tp_rank == 0
        self.followers = groups.tp_size > 1
        self.src = groups.layout.rank_of(groups.rank_layout.dp_rank, 0, 0)
        num_pages = plan_pages(model, config, self.max_model_len)
        self.cache = model.new_cache(num_pages, config.page_size)
        self.pages = PageAllocator(num_pages, config.page_size)
        self.scheduler = Scheduler(config, self.pages)
        self.adapters = AdapterManager(model.pool, model.cfg.raw)
        use_graphs = config.graph_buckets and (capture is not None or model.device.type == "cuda")
        graphs = GraphRunner(model, self.cache, config, self.max_model_len, self.is_leader,
                             capture) if use_graphs else None
        self.worker = Worker(model, self.cache, self.is_leader, graphs)
        eos = set(model.cfg.eos_token_ids) or set(getattr(codec, "eos_token_ids", ()) or ())
        self.eos_ids = frozenset(eos)
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        # Called on the leader once a step's forward is queued on the device, before the step
        # waits for its sampled tokens (the server hands the previous step's outputs to its
        # connections there, while the device works: serve/loop.py).
        self.after_launch = None
        self.counters = dict(prompt_tokens=0, output_tokens=0, steps=0, graph_steps=0,
                             decode_steps=0, step_seconds=0.0, ahead_steps=0)
        # The step launched and not read back yet (step.Launched), with async_steps.
        self._in_flight = None
        self.async_steps = ASYNC_STEPS and config.async_steps
        self.finished_by_adapter: dict[str, int] = {}

    @classmethod
    def from_pretrained(cls, model_dir: str, adapters: dict | None = None, *, tp: int = 1,
                        ep: int = 1, dtype="float32", device=None, groups=None,
                        config: EngineConfig | None = None, progress: bool = True,
                        capture: bool | None = None, model_config=None,
                        **options) -> "Engine":
        """Load a Hugging Face MoE model directory (this rank's slices) and its adapters.

        ``adapters``: name -> PEFT directory or :class:`~moelora_dist.adapters.CanonicalAdapter`.
        ``tp``/``ep``: the layout (under torchrun; one process needs 1/1). ``dtype``:
        ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype. ``options``: any
        :class:`EngineConfig` field (``max_num_seqs=64``, ``num_pages=...``).
        ``model_config``: the directory's parsed :class:`~moelora_dist.config.model.ModelConfig`
        when the caller has it (e.g. with FP8 dequantization switched on).
        """
        from moelora_dist.config.model import ModelConfig
        from moelora_dist.dtypes import dtype_of
        from moelora_dist.engine.build import make_groups
        from moelora_dist.models.model import MoELoRAModel
        from moelora_dist.models.weights import CheckpointWeights

        config = config or EngineConfig(**options)
        config.validate()
        cfg = model_config or ModelConfig.from_dir(model_dir)
        dt = dtype if isinstance(dtype, torch.dtype) else dtype_of(dtype)
        groups = groups or make_groups(tp, ep, device)
        model = MoELoRAModel.build(cfg, groups, CheckpointWeights(model_dir, cfg, dt), dtype=dt,
                                   max_loras=config.max_loras, max_rank=config.max_rank,
                                   dispatcher=config.dispatcher, progress=progress,
                                   max_positions=config.max_model_len)
        codec, error = load_codec(model_dir)
        engine = cls(model, config, codec, capture, error)
        for name, adapter in (adapters or {}).items():
            engine.adapters.add(name, adapter)  # every rank: the engine is built collectively
        engine.adapters.take_ops()
        return engine

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter, **load_kwargs):
        """Register a PEFT directory or an in-memory ``CanonicalAdapter`` while requests run
        (checked against every layer now). On a follower rank only the name is noted, for
        checking requests (the leader's next plan carries the weights). ``load_kwargs``:
        ``force_shared_outer``, ``strict``."""
        if not self.is_leader:
            self.adapters.announce(name)
            return None
        adapter = self.adapters.add(name, adapter, **load_kwargs)
        if self.groups.is_rank0:
            log.info("adapter %r: rank %d, %d MoE layers, %d dense modules (%s)", name,
                     adapter.max_rank, len(adapter.moe), len(adapter.dense), adapter.format)
        return adapter

    def remove_adapter(self, name: str) -> None:
        """Refuse new requests for ``name`` now; unload it once its requests finished."""
        if self.is_leader:
            self.adapters.remove(name, in_use=name in self._adapters_in_use())
        else:
            self.adapters.withdraw(name)

    @property
    def adapter_names(self) -> list[str]:
        return sorted(set(self.adapters.registry) - self.adapters.removing)

    def _adapters_in_use(self) -> set[str]:
        s = self.scheduler
        return {q.adapter for q in s.waiting + s.running if q.adapter is not None}

    # -- requests -----------------------------------------------------------------------------

    def _leader_only(self, what: str) -> None:
        if not self.is_leader:
            raise OptionError(f"{what}() runs on the leader rank (TP rank 0 of each replica); "
                              "call follow() on the other ranks")

    def check_request(self, prompt, sampling: SamplingParams | None, adapter: str | None,
                      want_prompt_logits: bool = False) -> tuple[list[int], SamplingParams]:
        """``(prompt ids, sampling)`` of a valid request, else a ``MoeloraError`` naming the
        problem; reads nothing but the request (any rank can check any request)."""
        ids = prompt_ids(prompt, self.codec, self.cfg.vocab_size, self.codec_error)
        params = sampling or SamplingParams()
        if params.stop and self.codec is None:
            raise RequestError("stop strings need the model's tokenizer (the model directory "
                               "has none, or the 'text' extra is not installed); use "
                               "stop_token_ids")
        check_request(ids, params, adapter, self.adapters, self.cfg.vocab_size,
                      self.max_model_len, self.pages.num_pages, self.config.page_size,
                      0 if want_prompt_logits else params.max_tokens)
        return ids, params

    def add_request(self, request_id: str, prompt, sampling: SamplingParams | None = None,
                    adapter: str | None = None, *, want_prompt_logits: bool = False) -> None:
        """Queue a request: ``prompt`` is token ids, a text (needs a tokenizer) or chat
        ``messages`` (``[{"role": ..., "content": ...}]``). Checked here, before any work."""
        self._leader_only("add_request")
        if self.scheduler.find(request_id) is not None:
            raise RequestError(f"request id {request_id!r} is already running or waiting")
        ids, params = self.check_request(prompt, sampling, adapter, want_prompt_logits)
        arrival = next(self._arrivals)
        seq = Sequence(request_id, arrival, ids, params, adapter, request_seed(params),
                       max_new=0 if want_prompt_logits else params.max_tokens,
                       want_prompt_logits=want_prompt_logits)
        if self.codec is not None:
            seq.detokenizer = self.codec.detokenizer(ids)
            seq.stop_matcher = StopMatcher(params.stop) if params.stop else None
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request now: its pages return to the pool and its adapter's slot is no
        longer pinned for it. False when no such request is waiting or running."""
        self._leader_only("abort")
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        # A step in flight may hold it: its tokens there are dropped (step.complete_step).
        seq.status = Status.FINISHED
        drop_pending(seq)
        self.adapters.prepare(self.scheduler.running_adapters())
        return True

    def has_unfinished(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_unfinished()

    def drain(self) -> list:
        """Read back the step in flight, if any (``async_steps``), launching none after it;
        returns its outputs."""
        step, self._in_flight = self._in_flight, None
        return complete_step(self, step) if step is not None else []

    def step(self):
        """Run one forward of the running batch; returns a
        :class:`~moelora_dist.engine.outputs.RequestOutput` per request that changed.

        With ``async_steps`` the forward read back here is one launched earlier: before
        waiting for its tokens the next step is scheduled and queued behind it (when that
        needs no preemption), so the host's scheduling, planning and output handling run
        while the device works (:mod:`.step`)."""
        self._leader_only("step")
        t0 = time.perf_counter()
        self.adapters.settle(self._adapters_in_use())
        step, self._in_flight = self._in_flight, None
        if step is None:
            scheduled = self.scheduler.schedule()
            if not scheduled.entries:
                self.counters["step_seconds"] += time.perf_counter() - t0
                return []
            step = launch_step(self, scheduled)
        if self.async_steps:
            ahead = self.scheduler.schedule(ahead=True)
            if ahead is not None and ahead.entries:
                self._in_flight = launch_step(self, ahead, step)
                self.counters["ahead_steps"] += 1
        outputs = complete_step(self, step)
        self.counters["step_seconds"] += time.perf_counter() - t0
        return outputs

    def follow(self) -> None:
        """On a follower rank: execute the leader's plans until it stops (:meth:`shutdown`,
        or the end of a collective :meth:`generate`)."""
        if self.is_leader:
            raise OptionError("follow() runs on the follower ranks; the leader calls step()")
        g = self.groups
        while True:
            plan = recv_plan(g.tp_group, self.src, g.device)
            if plan is None:
                return
            if plan.ops:
                self.adapters.apply(plan.ops, g.tp_group, self.src, g.device)
            self.worker.execute(plan)

    def shutdown(self) -> None:
        """On the leader: end the followers' :meth:`follow` loop."""
        if self.is_leader and self.followers:
            send_stop(self.groups.tp_group, self.src, self.groups.device)

    def keepalive(self) -> None:
        """On an idle leader (a server between requests): tell the followers it is alive,
        so their wait for the next plan never reaches the job's collective timeout."""
        if self.is_leader and self.followers:
            send_idle(self.groups.tp_group, self.src, self.groups.device)

    def send_adapter_tensors(self, ops, outgoing) -> None:
        for op in ops:
            if op["op"] == "add" and op["name"] in outgoing:
                send(outgoing[op["name"]], self.groups.tp_group, self.src, self.groups.device)

    def metrics(self) -> EngineMetrics:
        s, pool = self.scheduler, self.model.pool
        per: dict[str, AdapterCounts] = {n: AdapterCounts() for n in self.adapter_names}
        for q, field in [(q, "running") for q in s.running] + [(q, "waiting") for q in s.waiting]:
            if q.adapter is not None:
                c = per.setdefault(q.adapter, AdapterCounts())
                setattr(c, field, getattr(c, field) + 1)
        for name, n in self.finished_by_adapter.items():
            per.setdefault(name, AdapterCounts()).finished = n
        c = self.counters
        return EngineMetrics(len(s.running), len(s.waiting), c["prompt_tokens"],
                             c["output_tokens"], self.pages.num_used, self.pages.num_pages,
                             self.config.page_size, len(pool.loaded()), pool.config.max_loras,
                             s.num_preemptions, c["steps"], c["graph_steps"], per,
                             decode_steps=c["decode_steps"], step_seconds=c["step_seconds"])

    # -- collective conveniences ------------------------------------------------------------------

    def _session(self, prompts, sampling, adapter, want_logits: bool, progress: bool):
        """Check every request on every rank, then serve this replica's share; yields the
        leader's outputs and returns when all are done (followers follow)."""
        n = len(prompts)
        params = sampling if isinstance(sampling, (list, tuple)) else [sampling] * n
        names = adapter if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(params) != n or len(names) != n:
            raise OptionError(f"{n} prompts but {len(params)} sampling params and "
                              f"{len(names)} adapters; give one each or one for all")
        checked = []
        for i, (p, s, a) in enumerate(zip(prompts, params, names)):
            try:
                checked.append(self.check_request(p, s, a, want_logits))
            except RequestError as exc:
                raise RequestError(f"request {i}: {exc}") from None
        layout, me = self.groups.layout, self.groups.rank_layout.dp_rank
        mine = [i for i in range(n) if i % layout.dp == me]
        if not self.is_leader:
            self.follow()
            return mine, checked, {}
        tag = next(self._ids)
        rids = {f"_s{tag}_{i}": i for i in mine}
        for rid, i in rids.items():
            self.add_request(rid, checked[i][0], checked[i][1], names[i],
                             want_prompt_logits=want_logits)
        return mine, checked, rids

    def generate(self, prompts: list, sampling=None, adapter=None,
                 progress: bool = False) -> list[Completion | None]:
        """Serve ``prompts`` (each token ids, text or messages) to the end; collective.

        ``sampling``: one :class:`SamplingParams` for all or one per prompt (default
        ``SamplingParams()``); ``adapter``: a name or None for all, or one per prompt.
        Returns one :class:`Completion` per prompt, in order, on global rank 0.
        """
        mine, checked, rids = self._session(prompts, sampling, adapter, False, progress)
        results: list[Completion | None] = [None] * len(prompts)
        if self.is_leader:
            done = {i: Completion(rid, checked[i][0], [], None) for rid, i in rids.items()}
            from tqdm import tqdm

            bar = tqdm(total=len(rids), desc="generate", unit="req",
                       disable=not (progress and self.groups.is_rank0))
            while self.has_unfinished():
                for out in self.step():
                    done[rids[out.request_id]].absorb(out)
                    bar.update(int(out.finished))
            bar.close()
            self.shutdown()
            for i, c in done.items():
                c.request_id = str(i)
                results[i] = c
        return gather.completions(self.groups, results)

    def stream(self, prompts: list, sampling=None, adapter=None):
        """Like :meth:`generate`, but yields each step's
        :class:`~moelora_dist.engine.outputs.RequestOutput` as it comes (``request_id`` is
        the prompt's index as a string). Followers yield nothing; single replica only."""
        if self.groups.layout.dp > 1:
            raise OptionError("stream() serves one replica; with data parallelism use "
                              "generate(), or one engine per replica")
        _, _, rids = self._session(prompts, sampling, adapter, False, False)
        if not self.is_leader:
            return
        try:
            while self.has_unfinished():
                for out in self.step():
                    out.request_id = str(rids[out.request_id])
                    yield out
        finally:
            for rid in rids:
                if self.scheduler.find(rid) is not None:
                    self.abort(rid)
            self.drain()
            self.shutdown()

    def prompt_logits(self, prompts: list, adapter=None,
                      progress: bool = False) -> list[torch.Tensor | None]:
        """fp32 logits ``[L_i, V]`` of every prompt position (CPU); collective, chunked and
        batched like any request (the ``logits`` job)."""
        mine, checked, rids = self._session(prompts, SamplingParams(max_tokens=1,
                                                                    temperature=0.0),
                                            adapter, True, progress)
        out: list[torch.Tensor | None] = [None] * len(prompts)
        if self.is_leader:
            seqs = {rid: self.scheduler.find(rid) for rid in rids}
            while self.has_unfinished():
                self.step()
            self.shutdown()
            for rid, i in rids.items():
                out[i] = torch.cat(seqs[rid].prompt_logits)
        shapes = [(len(ids), self.cfg.vocab_size) for ids, _ in checked]
        return gather.logits(self.groups, out, shapes)
