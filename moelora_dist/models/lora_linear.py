"""Multi-LoRA on the dense linear layers (attention q/k/v/o, dense MLPs), per token.

Legend: T tokens, S slots, R max rank, I input features (rank-local), O output features
(rank-local). The pool stores ``a [S, R, I]`` and ``b [S, O, R]`` with the LoRA scaling folded
into ``b``; ``token_slot_T`` says which slot each token uses (``-1``: none).

The computation is the dense-LoRA kernel family (:mod:`moelora_dist.kernels.dense_lora`): the
reference on CPU (the rows of each slot, selected), the Triton kernels on CUDA (tokens sorted
by slot once per forward, blocks of one slot). Either way a slot's factors only ever touch its
own tokens, and the kernels read the pool's buffers directly: loading, evicting or replacing
an adapter writes those buffers in place, which a captured CUDA graph then sees with no copy.

Tensor-parallel use: for a column-parallel layer ``b`` holds this rank's output rows; for a
row-parallel layer ``a`` holds this rank's input columns, so the shrink is a partial sum over
TP and the delta rides on the same all-reduce as the base output.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from moelora_dist.kernels.block_fp8 import naive as fp8_naive
from moelora_dist.kernels.dense_lora import naive as dense_naive
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight, can_cat_rows, cat_rows
from moelora_dist.lora.batch_info import BatchInfo


# On CUDA, the shrink of a group runs on a side stream while the caller's base GEMMs run on its
# own (``DenseLoRA.begin`` ... ``PendingLoRA.finish``): at decode sizes the shrink is a few
# microseconds of latency that the base GEMM, which leaves most SMs idle there, can hide. Up to
# this many tokens; 0 turns it off (every launch on the caller's stream, in the same order).
OVERLAP_MAX_TOKENS = 512

# On CUDA, the expand of q/k/v runs inside the page write and o's inside the residual add +
# norm that follows attention (one-GPU layouts: under TP o's delta must join the all-reduce),
# instead of a ``dense_expand`` launch each: two launches less per layer with adapters
# (``kernels.dense_lora.ops.TokenLoRA``). Off until it has run on a GPU: built and tested under
# the interpreter on 2026-12-04 (S10), when no device machine was lent;
# `benchmarks/device/with_constants.py` turns it on for an A/B
# (moelora_dist.models.lora_linear:FUSE_EXPAND=true).
FUSE_EXPAND = False

_side_streams: dict[int, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


class PendingLoRA:
    """The LoRA of a group whose shrink is under way (:meth:`DenseLoRA.begin`); :meth:`finish`
    adds the deltas into the base outputs once they exist. Call it exactly once."""

    def __init__(self, lora: "DenseLoRA", x_TI: torch.Tensor, modules, shrinks, side):
        self.lora, self.x_TI, self.modules = lora, x_TI, modules
        self.shrinks, self.side = shrinks, side

    def finish(self, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        """``ys``: the base outputs ``[T, O]`` of the modules :meth:`DenseLoRA.begin` named, in
        its order (updated in place: the fp32 delta added and rounded once to ``y``'s dtype).
        Returns them."""
        if len(ys) != len(self.modules):
            raise ValueError(f"{len(ys)} outputs for a group of {len(self.modules)} modules")
        lora, pool = self.lora, self.lora.pool
        b_list = self._b_list()
        if self.shrinks is None:  # the reference: everything here
            a_list = [pool.dense_buffers(path).a for path, _ in self.modules]
            dense_naive.add_dense_lora(ys, self.x_TI, a_list, b_list, lora.token_slot_T,
                                       pool.slot_rank_S)
            return ys
        from moelora_dist.kernels.dense_lora import ops  # Triton: optional off x86-64 Linux

        self._join_side()
        ops.dense_expand(ys, b_list, self.shrinks, pool.slot_rank_S, lora._plan)
        return ys

    def token_lora(self):
        """Instead of :meth:`finish` (call one of them, once): the group as a per-token
        consumer kernel takes it to add the deltas itself
        (:class:`~moelora_dist.kernels.dense_lora.ops.TokenLoRA`; the Triton path of a group
        of up to three modules)."""
        if self.shrinks is None or len(self.shrinks) != 1:
            raise ValueError("a fused expand needs the Triton shrink of one group")
        from moelora_dist.kernels.dense_lora import ops  # Triton: optional off x86-64 Linux

        self._join_side()
        lora = self.lora
        return ops.TokenLoRA(self.shrinks[0], self._b_list(), lora.token_slot_T,
                             lora.slot_enabled_S, lora.pool.slot_rank_S)

    def _b_list(self) -> list[torch.Tensor]:
        bufs = [self.lora.pool.dense_buffers(path) for path, _ in self.modules]
        return [buf.b if rows is None else buf.b[:, rows]
                for buf, (_, rows) in zip(bufs, self.modules)]

    def _join_side(self) -> None:
        """The caller's stream waits for the shrink on the side stream (if it ran there)."""
        if self.side is not None:
            torch.cuda.current_stream(self.x_TI.device).wait_stream(self.side)


class DeferredLoRA(NamedTuple):
    """A module's base output whose LoRA delta its consumer adds (:data:`FUSE_EXPAND`): the
    residual add + norm after attention fuses o's expand; any other consumer calls
    :meth:`resolve` (the expand launch, as :func:`linear_with_lora` would have run it)."""

    base: torch.Tensor
    pending: PendingLoRA

    def resolve(self) -> torch.Tensor:
        return self.pending.finish([self.base])[0]


class DenseLoRA:
    """The dense-module LoRA of one forward pass: built once per forward, shared by every
    layer (the token plan of the Triton path is made once, on first use).

    Args:
        pool: the :class:`~moelora_dist.lora.pool.LoRAPool` (``dense_buffers(path)``).
        batch_info: this forward's :class:`~moelora_dist.lora.batch_info.BatchInfo`.
        backend: ``"torch"`` (reference) or ``"triton"``.
    """

    def __init__(self, pool, batch_info: BatchInfo, backend: str):
        self.pool = pool
        self.token_slot_T = batch_info.token_slot_T
        self.slot_enabled_S = batch_info.slot_enabled_S
        self.backend = backend
        self._plan = None

    @property
    def fuses_expand(self) -> bool:
        """Whether consumers fuse the expand (:data:`FUSE_EXPAND` on the Triton path)."""
        return FUSE_EXPAND and self.backend == "triton"

    def begin(self, x_TI: torch.Tensor, modules) -> PendingLoRA:
        """Start the LoRA of several modules that read the same input ``x`` (q, k and v: one
        shrink launch reads ``x`` once for all of them), before their base outputs exist.

        Args:
            x_TI: ``[T, I]`` the shared input.
            modules: ``(path, out_rows)`` per module: its pool path and the rows of a
                replicated ``b`` this rank computes (or None).
        Returns:
            a :class:`PendingLoRA`; on CUDA up to :data:`OVERLAP_MAX_TOKENS` tokens its shrink
            runs on a side stream that waits for ``x`` (the caller's stream waits for it in
            ``finish``), otherwise on the caller's stream.
        """
        modules = list(modules)
        if self.backend == "torch":
            return PendingLoRA(self, x_TI, modules, None, None)
        from moelora_dist.kernels.dense_lora import ops  # Triton: optional off x86-64 Linux

        if self._plan is None:  # on the caller's stream: every later launch reads it
            self._plan = ops.plan_tokens(self.token_slot_T, self.slot_enabled_S,
                                         self.pool.slot_rank_S)
        a_list = [self.pool.dense_buffers(path).a for path, _ in modules]
        # One slot-rank table for every module of the pool: a slot's rank is the largest
        # rank of its adapter, and the rows past a module's own rank are zero.
        side = None
        if x_TI.is_cuda and 0 < x_TI.shape[0] <= OVERLAP_MAX_TOKENS:
            side = _side_stream(x_TI.device)
            side.wait_stream(torch.cuda.current_stream(x_TI.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            shrinks = ops.dense_shrink(x_TI, a_list, self.pool.slot_rank_S, self._plan)
        return PendingLoRA(self, x_TI, modules, shrinks, side)

    def apply_group(self, x_TI: torch.Tensor, items) -> list[torch.Tensor]:
        """Add the LoRA delta of several modules that share the input ``x`` to base outputs
        that already exist (:meth:`begin` then ``finish`` at once: nothing to overlap).

        Args:
            x_TI: ``[T, I]`` the shared input.
            items: ``(y_TO, path, out_rows)`` per module: its base output ``[T, O]`` (updated
                in place: the fp32 delta is added and rounded once to ``y``'s dtype), its pool
                path, and the rows of a replicated ``b`` this rank computes (or None).
        Returns:
            the updated ``y_TO`` tensors.
        """
        pending = self.begin(x_TI, [(path, rows) for _, path, rows in items])
        return pending.finish([y for y, _, _ in items])

    def apply(self, y_TO: torch.Tensor, x_TI: torch.Tensor, path: str,
              out_rows: slice | None = None) -> torch.Tensor:
        """``y + B[slot] A[slot] x`` per token (in place, in ``y``'s dtype; fp32 shrink).

        Args: y_TO ``[T, O]`` base output; x_TI ``[T, I]`` the module's input.
        """
        return self.apply_group(x_TI, [(y_TO, path, out_rows)])[0]


def linear_with_lora(x_TI: torch.Tensor, w_OI: torch.Tensor, bias_O: torch.Tensor | None,
                     lora: DenseLoRA | None, path: str,
                     out_rows: slice | None = None) -> torch.Tensor:
    """``x @ w^T (+ bias) + LoRA delta`` in ``x``'s dtype.

    Args:
        x_TI: ``[T, I]``; w_OI: ``[O, I]`` rank-local base weight (a tensor in x's dtype, or a
            :class:`~moelora_dist.kernels.weights_fp8.BlockFP8Weight`); bias_O: ``[O]`` or None.
        lora: this forward's :class:`DenseLoRA`, or None when no token uses an adapter.
        path: module path in the pool (``layers.3.self_attn.q_proj``).
        out_rows: rows of the pool's ``b`` to use when the pool keeps the module replicated but
            this rank computes only some of its outputs (kv heads replicated over TP ranks).
    Returns:
        ``[T, O]`` in ``x_TI.dtype``.
    """
    if lora is None:
        return base_linear(x_TI, w_OI, bias_O)
    pending = lora.begin(x_TI, [(path, out_rows)])  # its shrink beside the base GEMM
    return pending.finish([base_linear(x_TI, w_OI, bias_O)])[0]


def base_linear(x_TI: torch.Tensor, w_OI, bias_O: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w^T (+ bias)`` of a base weight: ``F.linear`` for a tensor; for a block-FP8 weight
    the Triton kernel on CUDA, the reference elsewhere (both quantize ``x`` per token and 128
    columns; the LoRA delta added after reads the unquantized ``x``)."""
    if not isinstance(w_OI, BlockFP8Weight):
        return torch.nn.functional.linear(x_TI, w_OI, bias_O)
    if x_TI.is_cuda:
        from moelora_dist.kernels.block_fp8 import ops  # Triton: optional off x86-64 Linux

        return ops.block_fp8_linear(x_TI, w_OI, bias_O)
    return fp8_naive.block_fp8_linear(x_TI, w_OI, bias_O)


def fuse_rows(w: dict, names: tuple[str, ...], fused: str) -> bool:
    """Replace the base weights ``w[name]`` (same input, in order) by one weight ``w[fused]``
    whose rows are theirs concatenated, and each ``w[name]`` by a view of its rows, so that one
    GEMM (one launch) computes them all; the caller splits its output by the parts' rows.
    Their biases ``w[f"{name}.bias"]``, where the first part has one (then every part has),
    become ``w[f"{fused}.bias"]``. Done when all are tensors, or all block-FP8 parts that
    concatenate with their stored scales as they are
    (:func:`~moelora_dist.kernels.weights_fp8.can_cat_rows`: whole 128-row blocks, as q/k/v of
    128-dim heads are); anything else is left as it is. Returns whether it fused."""
    parts = [w[n] for n in names]
    if all(isinstance(p, torch.Tensor) for p in parts):
        w[fused] = torch.cat(parts).contiguous()
        views = w[fused].split([p.shape[0] for p in parts])
    elif all(isinstance(p, BlockFP8Weight) for p in parts) and can_cat_rows(parts):
        w[fused] = cat_rows(parts)
        starts = [0]
        for p in parts[:-1]:
            starts.append(starts[-1] + p.shape[0])
        views = [w[fused].row_view(s, s + p.shape[0]) for s, p in zip(starts, parts)]
    else:
        return False
    for n, view in zip(names, views):
        w[n] = view
    if f"{names[0]}.bias" in w:
        w[f"{fused}.bias"] = torch.cat([w.pop(f"{n}.bias") for n in names]).contiguous()
    return True
