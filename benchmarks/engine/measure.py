"""What the engine benchmark measures besides throughput: the bytes a decode step must read
(its HBM roofline), the GPU time of a replayed decode graph, and the host time of an eager
decode step per layer.

Legend: B sequences of the step, L layers, E experts, H hidden, I expert intermediate, R rank.

Bytes of one decode step, counted from what the step actually touches: every layer's attention
and router weights and norms; the experts the step's tokens route to (found by running the
step once with the routing recorded), 3 x H x I weights each; for each (adapter slot, expert)
pair some token of that slot routes to, that expert's LoRA factors (A and B of gate, up, down
at the slot's rank); each used slot's q/k/v/o factors; the LM head; and every sequence's KV
pages (keys and values of every cached token, every layer; only the window's on a sliding-window
layer). Biases and sinks (gpt-oss) count with their weights. A block-FP8 weight (experts and
q/k/v/o of ``--fp8``) counts its e4m3 values and its fp32 block scales.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from moelora_dist.engine.sampling import SamplingBatch, SamplingParams
from moelora_dist.engine.graphs import sampling_variant
from moelora_dist.engine.plan import build_plan
from moelora_dist.engine.sequence import Sequence
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight
from moelora_dist.moe.block import MoEBlock


@contextmanager
def recorded_routing(out: list):
    """Record every MoE layer's ``(topk_ids_TK)`` while the block is active."""
    real = MoEBlock.route

    def route(self, x_TH, *router_logits):
        w, ids = real(self, x_TH, *router_logits)
        out.append(ids)
        return w, ids

    MoEBlock.route = route
    try:
        yield out
    finally:
        MoEBlock.route = real


def _nbytes(t) -> int:
    """Bytes of a tensor, or of a block-FP8 weight's values and scales."""
    if isinstance(t, BlockFP8Weight):
        return t.nbytes()
    return t.numel() * t.element_size()


def decode_step_bytes(model, routing: list[torch.Tensor], token_slot_T: torch.Tensor,
                      kv_lens: list[int]) -> dict:
    """Bytes the decode step reads (module docstring), by kind."""
    cfg, pool = model.cfg, model.pool
    weights = _nbytes(model.lm_head_VH) + _nbytes(model.final_norm_H)
    experts = lora = 0
    slots = sorted({int(s) for s in token_slot_T.tolist() if s >= 0})
    rank_of = pool.slot_rank_S.tolist()
    moe_layers = [layer for layer in model.layers if "moe" in layer]
    for layer, ids in zip(moe_layers, routing):
        base = layer["moe"].base
        weights += _nbytes(base.router)
        per_expert = sum(_nbytes(t) for t in (base.w_gate_up, base.w_down, base.b_gate_up,
                                              base.b_down) if t is not None) \
            // base.w_gate_up.shape[0]  # biases (gpt-oss) with their expert
        experts += per_expert * int(torch.unique(ids[ids >= 0]).numel())
        buf = pool.moe_buffers(layer["moe"].layer_idx)
        item = buf.gate_up_a.element_size()
        for s in slots:
            mine = ids[token_slot_T[: ids.shape[0]] == s]
            n = int(torch.unique(mine[mine >= 0]).numel())
            # A gate/up [2r, H], B gate/up [2I, r], A down [r, I], B down [H, r]
            lora += n * item * rank_of[s] * (3 * buf.hidden + 3 * buf.i_local)
    for layer in model.layers:
        attn = layer["attn"]
        # q/k/v fused in one tensor, or three block-FP8 weights with their scales
        qkv = ("qkv_proj",) if "qkv_proj" in attn.w else ("q_proj", "k_proj", "v_proj")
        weights += sum(_nbytes(attn.w[k]) for k in qkv) + _nbytes(attn.w["o_proj"])
        weights += sum(_nbytes(attn.w[k]) for k in ("qkv_proj.bias", "o_proj.bias", "sinks")
                       if k in attn.w)
        weights += _nbytes(layer["ln1"]) + _nbytes(layer["ln2"])
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            buf = pool.dense_buffers(f"{attn.prefix}.{name}")
            per_rank_row = (buf.a.shape[2] + buf.b.shape[1]) * buf.a.element_size()
            lora += sum(rank_of[s] * per_rank_row for s in slots)
    # a sliding-window layer (gpt-oss) reads only its window's keys
    kv_layer_token = 2 * model.split.num_kv * cfg.head_dim * model.dtype.itemsize
    kv = kv_layer_token * sum(min(n, cfg.window_of(i) or n) for i in range(cfg.num_layers)
                              for n in kv_lens)
    return dict(weight_bytes=weights, expert_bytes=experts, lora_bytes=lora, kv_bytes=kv,
                total_bytes=weights + experts + lora + kv)


def fake_decode(engine, B: int, context: int, adapters: list[str | None], seed: int = 0):
    """Sequences of ``context`` cached tokens (pages taken from the allocator) about to
    decode one token each: ``(sequences, plan)`` of that step, eager unless a graph fits."""
    g = torch.Generator().manual_seed(seed)
    V = engine.cfg.vocab_size
    seqs = []
    for b in range(B):
        ids = torch.randint(0, V, (context + 1,), generator=g).tolist()
        s = Sequence(f"_fake{b}", -1, ids, SamplingParams(max_tokens=1, temperature=0.0),
                     adapters[b % len(adapters)], seed=b)
        s.num_computed = context
        engine.pages.grow(s.request_id, context + 1)
        seqs.append(s)
    slots = engine.adapters.prepare({s.adapter for s in seqs if s.adapter})
    lora = [slots[s.adapter] if s.adapter else -1 for s in seqs]
    return seqs, lora


def release(engine, seqs) -> None:
    for s in seqs:
        engine.pages.free(s.request_id)


def eager_host_ms(engine, seqs, lora, rounds: int = 5) -> dict:
    """Host and wall time of one eager decode step (best of ``rounds``): ``plan`` = building
    and copying the step plan; host = until every launch of the forward, LM head and sampling
    is issued (no sync inside); wall = until the GPU finished."""
    cfg = engine.config
    tables = [engine.pages.table(s.request_id) for s in seqs]
    dev = engine.model.device
    best = dict(plan=float("inf"), host=float("inf"), wall=float("inf"))
    params = [s.params for s in seqs]
    rows = list(range(len(seqs)))
    for _ in range(rounds):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        plan = build_plan(seqs, [1] * len(seqs), tables, lora, cfg.page_size, dev)
        sampling = SamplingBatch.from_params(params, [0] * len(seqs), [0] * len(seqs), dev)
        torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        res = engine.worker.execute(plan, sampling, rows, rows)
        t2 = time.perf_counter()
        res.sampled.token_ids_B.tolist()
        t3 = time.perf_counter()
        for k, v in (("plan", t1 - t0), ("host", t2 - t1), ("wall", t3 - t1)):
            best[k] = min(best[k], v)
    L = engine.cfg.num_layers
    return dict(eager_host_ms_per_layer=round(1e3 * best["host"] / L, 4),
                eager_step_ms=round(1e3 * best["wall"], 3),
                plan_ms=round(1e3 * best["plan"], 3))


def graph_replay_ms(engine, seqs, lora, reps: int = 20) -> tuple[float, dict]:
    """GPU time of the replayed decode graph of this step (median of ``reps``, CUDA events),
    and the bytes the step reads (:func:`decode_step_bytes`)."""
    cfg, graphs, dev = engine.config, engine.worker.graphs, engine.model.device
    P = graphs.bucket_for(len(seqs))
    tables = [engine.pages.table(s.request_id) for s in seqs]
    pad = SamplingParams(max_tokens=1, temperature=0.0)
    sampling = SamplingBatch.from_params([pad] * P, [0] * P, [0] * P, dev)
    plan = build_plan(seqs, [1] * len(seqs), tables, lora, cfg.page_size, dev, P,
                      graph_sampling=sampling_variant(sampling))
    engine.worker.execute(plan, sampling, list(range(len(seqs))))  # captures if needed
    key = graphs.key(plan)
    graph = graphs._graphs[key][0]
    routing: list = []
    with recorded_routing(routing):
        graphs._step(*key)  # the same static step, uncaptured, to see where tokens route
    token_slot = torch.tensor(lora + [-1] * (P - len(seqs)), device=dev)
    nbytes = decode_step_bytes(engine.model, [r[: len(seqs)] for r in routing],
                               token_slot[: len(seqs)], [s.num_computed + 1 for s in seqs])
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize(dev)
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2], nbytes
