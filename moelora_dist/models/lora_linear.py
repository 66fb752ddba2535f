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

import torch

from moelora_dist.kernels.block_fp8 import naive as fp8_naive
from moelora_dist.kernels.dense_lora import naive as dense_naive
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight
from moelora_dist.lora.batch_info import BatchInfo


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

    def _run(self, ys, x_TI, a_list, b_list, slot_rank_S):
        if self.backend == "torch":
            dense_naive.add_dense_lora(ys, x_TI, a_list, b_list, self.token_slot_T, slot_rank_S)
            return
        from moelora_dist.kernels.dense_lora import ops  # Triton: optional off x86-64 Linux

        if self._plan is None:
            self._plan = ops.plan_tokens(self.token_slot_T, self.slot_enabled_S, slot_rank_S)
        ops.add_dense_lora(ys, x_TI, a_list, b_list, self.token_slot_T, slot_rank_S, self._plan)

    def apply_group(self, x_TI: torch.Tensor, items) -> list[torch.Tensor]:
        """Add the LoRA delta of several modules that share the input ``x`` (q, k and v).

        Args:
            x_TI: ``[T, I]`` the shared input.
            items: ``(y_TO, path, out_rows)`` per module: its base output ``[T, O]`` (updated
                in place: the fp32 delta is added and rounded once to ``y``'s dtype), its pool
                path, and the rows of a replicated ``b`` this rank computes (or None).
        Returns:
            the updated ``y_TO`` tensors.
        """
        bufs = [self.pool.dense_buffers(path) for _, path, _ in items]
        a_list = [buf.a for buf in bufs]
        b_list = [buf.b if rows is None else buf.b[:, rows]
                  for buf, (_, _, rows) in zip(bufs, items)]
        ys = [y for y, _, _ in items]
        # One slot-rank table for every module of the pool: a slot's rank is the largest
        # rank of its adapter, and the rows past a module's own rank are zero.
        self._run(ys, x_TI, a_list, b_list, self.pool.slot_rank_S)
        return ys

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
    y_TO = base_linear(x_TI, w_OI, bias_O)
    if lora is None:
        return y_TO
    return lora.apply(y_TO, x_TI, path, out_rows)


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
