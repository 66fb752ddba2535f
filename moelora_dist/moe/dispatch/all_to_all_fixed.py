"""Fixed-capacity all-to-all dispatcher: only the tokens a destination needs, in place, no
split exchange; an exact second exchange when a destination needs more than the capacity.

Legend: T tokens, H hidden, K top-k, P EP degree, C0 = ceil(T / P) tokens per share, n tokens
of this rank's share, C capacity (rows per destination), N rows this rank computes.

Pipeline on the rank at ``(moe_ep_rank = me, moe_tp_rank = m)`` (shares as in
:mod:`.all_to_all`: EP rank ``e`` of column ``m`` takes share ``e``, MoE-TP peers the same):

1. ``dispatch_index`` numbers, for every destination, the share tokens that need it (token
   order); ``pack_main`` writes each destination's first ``C`` of them as byte rows
   (:mod:`moelora_dist.kernels.dispatch.wire`: weights, ids local to the destination, adapter
   slot, a header with the count) straight into the exchange buffer, padding rows routed
   nowhere. This rank's own rows go directly into its receive block (``bypass_self``).
2. One ``all_to_all_single`` with splits of ``C`` rows per peer, known on the host from ``T``:
   no split exchange, no host sync, CUDA-graph safe.
3. If ``C < C0`` a destination may need more than ``C`` rows. The headers that arrived with the
   rows say so (each source flags "I overflowed towards someone", so every rank sees the same
   answer without another collective); reading them is this path's one host sync. If any
   source overflowed, the excess rows go in a second, uneven ``all_to_all_single`` and are
   appended to the received rows: every token's result stays exact. ``stats`` counts it and a
   log line reports it. With ``C == C0`` (the capacity rule reaches the share, e.g. top-8 of
   128 experts on EP 2) nothing can overflow and nothing is read back.
4. ``unpack_meta`` gives the experts contiguous weights / ids / slots; ``x_NH`` is a view of
   the receive buffer (rows strided by the row size), read in place.
5. Combine: the results go back with the same splits; ``combine`` sums each token's copies
   (its own rank's straight from the experts' output) in fp32 into the padded share
   ``[C0, H]``; ``all_reduce`` over MoE-TP adds the ``I`` slices and ``all_gather`` over EP
   puts the shares together, so every TP rank ends with ``[T, H]``.

Under CUDA-graph capture the capacity is ``C0`` whatever the rule says: a captured graph
cannot read headers or size a second exchange, so it sends what the static dispatcher sends and
can never overflow (results exact, bytes as ``all_to_all_static`` where the rule gives less).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moelora_dist.errors import OptionError
from moelora_dist.kernels.device import capturing as graph_capturing
from moelora_dist.kernels.dispatch import naive
from moelora_dist.kernels.dispatch.wire import (HEADER_COUNT_MASK, HEADER_OVERFLOW_BIT,
                                                MAX_TOKENS, DispatchIndex, RowFormat,
                                                exchange_splits, row_format, send_blocks,
                                                source_of_recv_block)
from moelora_dist.moe.dispatch.base import Dispatcher, Routed
from moelora_dist.moe.dispatch.capacity import CapacityRule, capacity_rows
from moelora_dist.moe.dispatch.packing import all_gather_into, share_bounds
from moelora_dist.parallel.groups import group_size

log = logging.getLogger(__name__)

KERNEL_BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class FixedConfig:
    """``capacity``: the rule (:mod:`.capacity`); ``bypass_self``: this rank's own rows skip
    the collective; ``backend``: ``"torch"`` (references) or ``"triton"`` for the packing
    kernels, None = Triton for CUDA tensors."""

    capacity: CapacityRule = CapacityRule()
    bypass_self: bool = True
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in KERNEL_BACKENDS:
            raise OptionError(f"unknown dispatch kernel backend {self.backend!r}; pick one of "
                              f"{KERNEL_BACKENDS}")


@dataclass
class DispatchStats:
    """Counters a layer or a benchmark reads: ``checked_calls`` read the headers back (C < C0),
    ``overflow_calls`` needed the second exchange, ``overflow_rows`` this rank sent in it."""

    calls: int = 0
    checked_calls: int = 0
    overflow_calls: int = 0
    overflow_rows: int = 0
    last_capacity: int = 0
    last_share: int = 0


@dataclass
class _Overflow:
    send_P: list[int]
    recv_P: list[int]
    send_off_P: list[int]


@dataclass
class _State:
    num_tokens: int
    share: tuple[int, int]
    C0: int
    cap: int
    bypass: bool
    index: DispatchIndex | None
    kernels: object
    overflow: _Overflow | None = None
    main_rows: int = 0


@dataclass
class _Plan:
    C0: int
    cap: int
    bypass: bool
    fmt: RowFormat
    share: tuple[int, int]


class AllToAllFixedDispatcher(Dispatcher):
    """Fixed capacity per destination, packed in place; see the module docstring."""

    name = "all_to_all_fixed"

    def __init__(self, groups, shard, config: FixedConfig | None = None):
        super().__init__(groups, shard)
        self.config = config or FixedConfig()
        self.stats = DispatchStats()

    def _kernels(self, x_TH: torch.Tensor):
        backend = self.config.backend or ("triton" if x_TH.is_cuda else "torch")
        if backend == "torch":
            return naive
        from moelora_dist.kernels.dispatch import ops  # Triton: optional off x86 Linux

        return ops

    def plan(self, num_tokens: int, hidden: int, top_k: int, dtype: torch.dtype,
             capturing: bool = False) -> _Plan:
        """Share, capacity and row format of a batch (host arithmetic only)."""
        P = self.groups.ep_size
        C0, cap = capacity_rows(num_tokens, P, top_k, self.shard.num_experts,
                                self.config.capacity)
        if capturing:
            cap = C0  # a graph cannot size a second exchange: lossless by construction
        share = share_bounds(num_tokens, P, self.groups.rank_layout.moe_ep_rank)
        return _Plan(C0, cap, self.config.bypass_self or P == 1,
                     row_format(hidden, top_k, dtype), share)

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T) -> Routed:
        g = self.groups
        P, me, e_local = g.ep_size, g.rank_layout.moe_ep_rank, self.shard.num_local_experts
        T, H = x_TH.shape
        K = topk_ids_TK.shape[1]
        if T > MAX_TOKENS:
            raise OptionError(f"a batch of {T} tokens exceeds the dispatcher's {MAX_TOKENS}")
        kern = self._kernels(x_TH)
        capturing = graph_capturing(x_TH.device)
        pl = self.plan(T, H, K, x_TH.dtype, capturing)
        self.stats.calls += 1
        self.stats.last_capacity, self.stats.last_share = pl.cap, pl.C0
        dev = x_TH.device
        if pl.C0 == 0:  # T == 0 on every rank of the TP group: nothing moves
            st = _State(T, pl.share, 0, 0, pl.bypass, None, kern)
            return Routed(x_TH.new_empty(0, H), topk_weights_TK.new_empty(0, K),
                          topk_ids_TK.new_empty(0, K),
                          None if token_slot_T is None else token_slot_T.new_empty(0), st)
        start, end = pl.share
        cap, fmt = pl.cap, pl.fmt
        ids_nK = topk_ids_TK[start:end]
        index = kern.dispatch_index(ids_nK, e_local, P, cap, pl.C0 - cap)
        buf = torch.empty((P + send_blocks(P, pl.bypass)) * cap, fmt.row_bytes,
                          dtype=torch.uint8, device=dev)
        shares = (x_TH[start:end], topk_weights_TK[start:end].float(), ids_nK,
                  None if token_slot_T is None else token_slot_T[start:end])
        kern.pack_main(buf, fmt, *shares, index, num_local_experts=e_local, capacity=cap,
                       me=me, bypass=pl.bypass)
        recv = buf[:P * cap]
        if P > 1:
            splits = exchange_splits(cap, me, P, pl.bypass)
            out = recv[cap:] if pl.bypass else recv
            sizes = splits if pl.bypass else None
            dist.all_to_all_single(out, buf[P * cap:], output_split_sizes=sizes,
                                   input_split_sizes=sizes, group=g.ep_group)
        st = _State(T, pl.share, pl.C0, cap, pl.bypass, index, kern, main_rows=P * cap)
        rows = recv
        if cap < pl.C0:
            self.stats.checked_calls += 1
            # The one host read of this path: own counts and every source's header.
            words = torch.cat([index.counts_P, fmt.headers(recv)[::cap]]).tolist()
            counts, headers = words[:P], words[P:]
            if any(h & HEADER_OVERFLOW_BIT for h in headers):
                st.overflow, extra = self._second_exchange(kern, fmt, shares, index, counts,
                                                           headers, cap, me, pl.bypass, dev)
                rows = torch.cat([recv, extra])
        w_NK, ids_NK, slot_N = kern.unpack_meta(rows, fmt)
        return Routed(fmt.x_view(rows), w_NK, ids_NK,
                      slot_N if token_slot_T is not None else None, st)

    def _second_exchange(self, kern, fmt, shares, index, counts, headers, cap, me, bypass,
                         dev):
        """Send every row past the capacity (uneven splits, eager); returns the split sizes
        and the received rows."""
        g, P = self.groups, self.groups.ep_size
        send_P = [max(0, c - cap) for c in counts]
        recv_P = [0] * P
        for b, h in enumerate(headers):
            recv_P[source_of_recv_block(b, me, bypass)] = max(0, (h & HEADER_COUNT_MASK) - cap)
        send_off_P = [sum(send_P[:d]) for d in range(P)]
        send = torch.empty(sum(send_P), fmt.row_bytes, dtype=torch.uint8, device=dev)
        kern.pack_overflow(send, fmt, *shares, index,
                           num_local_experts=self.shard.num_local_experts, capacity=cap,
                           rows_P=send_P, row_off_P=send_off_P)
        recv = torch.empty(sum(recv_P), fmt.row_bytes, dtype=torch.uint8, device=dev)
        dist.all_to_all_single(recv, send, output_split_sizes=recv_P, input_split_sizes=send_P,
                               group=g.ep_group)
        s = self.stats
        s.overflow_calls += 1
        s.overflow_rows += sum(send_P)
        if sum(send_P):
            level = logging.WARNING if s.overflow_calls & (s.overflow_calls - 1) == 0 else \
                logging.DEBUG
            log.log(level, "%s: capacity of %d rows per destination overflowed (EP rank %d "
                    "needs %s rows at its destinations); %d rows sent in a second exchange, "
                    "results exact (%d of %d calls overflowed)", self.name, cap, me, counts,
                    sum(send_P), s.overflow_calls, s.calls)
        return _Overflow(send_P, recv_P, send_off_P), recv

    def combine(self, y_NH: torch.Tensor, routed: Routed, *, gather: bool = True) -> torch.Tensor:
        """``y_NH [N, H]`` -> ``[T, H]`` on every TP rank (``gather=False``: this rank's share
        ``[n, H]``, before the EP all-gather)."""
        g, st = self.groups, routed.state
        H = y_NH.shape[1]
        if st.C0 == 0:
            return y_NH.new_zeros(0, H)
        P, me, cap = g.ep_size, g.rank_layout.moe_ep_rank, st.cap
        y = y_NH.contiguous()
        back = None
        if P > 1:
            main = y[:P * cap]
            if st.bypass:
                sizes = exchange_splits(cap, me, P, True)
                back = y.new_empty((P - 1) * cap, H)
                dist.all_to_all_single(back, main[cap:], output_split_sizes=sizes,
                                       input_split_sizes=sizes, group=g.ep_group)
            else:
                back = torch.empty_like(main)
                dist.all_to_all_single(back, main, group=g.ep_group)
        back_o = off = None
        if st.overflow is not None:
            o = st.overflow
            back_o = y.new_empty(sum(o.send_P), H)
            dist.all_to_all_single(back_o, y[st.main_rows:], output_split_sizes=o.send_P,
                                   input_split_sizes=o.recv_P, group=g.ep_group)
            if back_o.shape[0]:  # else none of this rank's tokens has a row past the capacity
                off = o.send_off_P
            else:
                back_o = None
        out_CH = y.new_empty(st.C0, H)
        st.kernels.combine(out_CH, st.index.pos_nP, y, back, back_o, off, capacity=cap, me=me,
                           bypass=st.bypass)
        if group_size(g.moe_tp_group) > 1:
            dist.all_reduce(out_CH, group=g.moe_tp_group)
        start, end = st.share
        if not gather:
            return out_CH[:end - start]
        if P == 1:
            return out_CH[:st.num_tokens]
        full = y.new_empty(P * st.C0, H)
        all_gather_into(full, out_CH, g.ep_group)
        return full[:st.num_tokens]
