"""The step plan: what every rank of a TP group executes for one forward, as plain tensors.

Legend: T tokens of the step, B sequences, M block-table width (the most pages any of them
holds), P a CUDA-graph bucket.

The leader (TP rank 0 of a replica) builds the plan from the scheduler's decision and
broadcasts it to its TP group; the other ranks only execute what they receive. On the wire a
plan is a fixed header ``[HEADER]`` int64 and one int64 payload laid out as::

    input ids [T'] | positions [T'] | slot mapping [T'] | seg_indptr [B'+1] | kv lens [B']
    | adapter slots [B'] | block tables [B' * M]

where ``T' = P, B' = Q`` for a step replayed from a graph of P tokens and Q sequences (Q = P,
or fewer where the engine cannot run that many: ``EngineConfig.graph_seqs``; padded: padding
tokens store nothing, padding sequences have no keys, the last one holds what is left of the
padding tokens) and ``T' = T, B' = B`` otherwise. After the payload, a
plan with adapter operations carries them as UTF-8 JSON bytes (names, slots, paths: never
pickled), and the tensors of an adapter given in memory follow (:mod:`.adapter_ops`).
A header of kind :data:`STOP` ends the followers' loop; one of kind :data:`IDLE` carries nothing
(a leader with no work sends it every few seconds, so that the followers' wait never reaches
the collective timeout of the job).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moelora_dist.kernels.device import to_device

STEP, STOP, IDLE = 1, 2, 3
HEADER = 10  # kind, T', B', M, lora tokens, decode only, graph P, logprobs, sampling, op bytes


@dataclass
class StepPlan:
    """One forward's inputs on the device (see the module docstring for the layout).

    ``payload``: the int64 device tensor the views below share; ``graph_bucket``: P when the
    step replays a graph (the 1-D fields are then padded to P), 0 for an eager step;
    ``num_lora_tokens``: tokens with an adapter (host; 0 leaves the LoRA path out);
    ``graph_logprobs`` / ``graph_sampling``: the top log-probabilities the graph computes and
    its sampling variant (:mod:`.graphs`), part of its key, so every rank captures the same
    graphs at the same step; ``ops``: adapter operations to
    apply before the forward (:mod:`.adapter_ops`).
    """

    payload: torch.Tensor
    num_tokens: int
    num_seqs: int
    width: int
    num_lora_tokens: int
    decode_only: bool
    graph_bucket: int = 0
    graph_logprobs: int = 0
    graph_sampling: int = 0
    ops: list[dict] = field(default_factory=list)

    def _views(self):
        T, B, M = self.num_tokens, self.num_seqs, self.width
        sizes = [T, T, T, B + 1, B, B, B * M]
        return self.payload.split(sizes)

    @property
    def input_ids_T(self) -> torch.Tensor:
        return self._views()[0]

    @property
    def positions_T(self) -> torch.Tensor:
        return self._views()[1]

    @property
    def slot_mapping_T(self) -> torch.Tensor:
        return self._views()[2]

    @property
    def seg_indptr_B1(self) -> torch.Tensor:
        return self._views()[3]

    @property
    def kv_lens_B(self) -> torch.Tensor:
        return self._views()[4]

    @property
    def lora_slot_B(self) -> torch.Tensor:
        return self._views()[5]

    @property
    def block_tables_BM(self) -> torch.Tensor:
        return self._views()[6].view(self.num_seqs, self.width)

    @property
    def one_d(self) -> torch.Tensor:
        """The 1-D fields (everything but the block tables), contiguous."""
        T, B = self.num_tokens, self.num_seqs
        return self.payload[: 3 * T + 3 * B + 1]

    def header(self) -> torch.Tensor:
        ops = json.dumps(self.ops).encode() if self.ops else b""
        return torch.tensor([STEP, self.num_tokens, self.num_seqs, self.width,
                             self.num_lora_tokens, int(self.decode_only), self.graph_bucket,
                             self.graph_logprobs, self.graph_sampling, len(ops)],
                            dtype=torch.int64)


def host_to_device(values: list[int], device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``, copied without waiting for the step in
    flight (:func:`~moelora_dist.kernels.device.to_device`)."""
    return to_device(torch.tensor(values, dtype=torch.int64), device)


def build_plan(seqs: list, counts: list[int], tables: list[list[int]], slots: list[int],
               page_size: int, device, graph_bucket: int = 0, graph_logprobs: int = 0,
               graph_sampling: int = 0, ops=None, graph_seqs: int | None = None) -> StepPlan:
    """The plan of sequences ``seqs`` adding ``counts[b]`` tokens each after their computed
    ones, with pages ``tables[b]`` and adapter slots ``slots[b]`` (``-1``: none).

    ``graph_bucket`` P pads the token fields to P and the sequence fields to ``graph_seqs``
    (None: P), which must leave a padding sequence when there are padding tokens (module
    docstring)."""
    B = len(seqs)
    T = sum(counts)
    P = graph_bucket
    Tp, Bp = (P, P if graph_seqs is None else graph_seqs) if P else (T, B)
    if P and (T > Tp or B + (T < Tp) > Bp):
        raise ValueError(f"a step of {T} tokens and {B} sequences does not fit a graph of "
                         f"{Tp} tokens and {Bp} sequences")
    ids, pos, slot_map, seg, kv, lora = [], [], [], [0], [], []
    num_lora = 0
    for seq, n, table, s in zip(seqs, counts, tables, slots):
        start = seq.num_computed
        ids += seq.tokens(start, start + n)
        pos += range(start, start + n)
        slot_map += [table[j // page_size] * page_size + j % page_size
                     for j in range(start, start + n)]
        seg.append(seg[-1] + n)
        kv.append(start + n)
        lora.append(s)
        if s >= 0:
            num_lora += n
    if P:
        ids += [0] * (P - T)
        pos += [0] * (P - T)
        slot_map += [-1] * (P - T)
        # Padding sequences take one padding token each, the last one all that are left (a
        # padded decode step, Bp = Tp, stays decode-only; a prompt chunk's graph has fewer
        # sequences than tokens).
        seg += [T + min(i + 1, Tp - T) for i in range(Bp - B - 1)] + [Tp] * (Bp > B)
        kv += [0] * (Bp - B)
        lora += [-1] * (Bp - B)
    M = max(1, max((len(t) for t in tables), default=1))
    bt = []
    for table in tables:
        bt += table + [0] * (M - len(table))
    bt += [0] * ((Bp - B) * M)
    # One host-to-device copy per step, queued behind the step in flight (if any).
    payload = host_to_device(ids + pos + slot_map + seg + kv + lora + bt, device)
    return StepPlan(payload, Tp, Bp, M, num_lora, max(counts) == 1 and Bp == Tp, P,
                    graph_logprobs, graph_sampling, list(ops or []))


def send_plan(plan: StepPlan, group, src: int, device) -> None:
    """Broadcast ``plan`` from the leader ``src`` (a global rank) to its TP group (queued
    behind the step in flight, as the plan's own copy: nothing here waits for the device)."""
    dist.broadcast(to_device(plan.header(), device), src=src, group=group)
    dist.broadcast(plan.payload, src=src, group=group)
    if plan.ops:
        data = torch.frombuffer(bytearray(json.dumps(plan.ops).encode()), dtype=torch.uint8)
        dist.broadcast(data.to(device), src=src, group=group)


def send_stop(group, src: int, device, kind: int = STOP) -> None:
    header = torch.zeros(HEADER, dtype=torch.int64)
    header[0] = kind
    dist.broadcast(header.to(device), src=src, group=group)


def send_idle(group, src: int, device) -> None:
    """Tell the followers the leader is alive with nothing to run (module docstring)."""
    send_stop(group, src, device, IDLE)


def recv_plan(group, src: int, device) -> StepPlan | None:
    """The next plan from the leader ``src``; None when it says stop."""
    header = torch.empty(HEADER, dtype=torch.int64, device=device)
    kind = IDLE
    while kind == IDLE:
        dist.broadcast(header, src=src, group=group)
        kind, T, B, M, num_lora, decode_only, P, graph_lp, graph_sampling, nbytes = \
            header.tolist()
    if kind == STOP:
        return None
    assert kind == STEP, f"unknown plan kind {kind}"
    payload = torch.empty(3 * T + 3 * B + 1 + B * M, dtype=torch.int64, device=device)
    dist.broadcast(payload, src=src, group=group)
    ops = []
    if nbytes:
        data = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dist.broadcast(data, src=src, group=group)
        ops = json.loads(bytes(data.cpu().tolist()).decode())
    return StepPlan(payload, T, B, M, num_lora, bool(decode_only), P, graph_lp, graph_sampling,
                    ops)
