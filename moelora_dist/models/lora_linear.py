"""Multi-LoRA on the dense linear layers (attention q/k/v/o, dense MLPs), per token.

Legend: T tokens, S slots, R max rank, I input features (rank-local), O output features
(rank-local). The pool stores ``a [S, R, I]`` and ``b [S, O, R]`` with the LoRA scaling folded
into ``b``; ``token_slot_T`` says which slot each token uses (``-1``: none).

Why all slots at once: ``x @ A_all^T`` over the ``S*R`` stacked rows, masked to each token's own
slot, then one GEMM with the stacked ``B``. No gather of per-token weight copies and no
data-dependent shapes or host syncs, so decode stays sync-free; the price is computing ``S*R``
shrink columns where ``R`` would do, which is small next to the base GEMM while ``S*R`` is a few
hundred. The shrink result stays in fp32 up to the expand (bf16 shrink results have produced
garbage generations in a peer engine).

Tensor cores (CUDA, bf16/fp16 models): the shrink multiplies the bf16 ``x`` and the bf16 pool
``A`` with fp32 accumulation and an fp32 result (``torch.mm(..., out_dtype=float32)``): the same
products as upcasting both, without the casts and without fp32 SIMT GEMMs. The expand runs in
TF32 (the fp32 shrink enters the tensor core with a 10-bit mantissa, ``B`` is bf16 and exact),
as the MoE LoRA kernels do; the result is rounded to bf16 anyway (8 bits). Set
``MOELORA_DENSE_LORA_FP32=1`` for plain fp32 GEMMs (measured side by side in docs/models.md).

Tensor-parallel use: for a column-parallel layer ``b`` holds this rank's output rows; for a
row-parallel layer ``a`` holds this rank's input columns, so the shrink is a partial sum over
TP and the delta rides on the same all-reduce as the base output.
"""

from __future__ import annotations

import contextlib
import os

import torch

FP32_ENV = "MOELORA_DENSE_LORA_FP32"
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_mm_out_dtype_ok: bool | None = None  # probed once: torch.mm(..., out_dtype=) exists on CUDA


def _tensor_cores(x_TI: torch.Tensor) -> bool:
    """Whether this forward's dense LoRA runs the tensor-core path (module docstring)."""
    global _mm_out_dtype_ok
    if not (x_TI.is_cuda and x_TI.dtype in _LOW_PRECISION) or os.environ.get(FP32_ENV) == "1":
        return False
    if _mm_out_dtype_ok is None:  # torch >= 2.8; a build without it keeps the fp32 path
        try:
            one = torch.ones(1, 1, dtype=x_TI.dtype, device=x_TI.device)
            _mm_out_dtype_ok = torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _mm_out_dtype_ok = False
    return _mm_out_dtype_ok


@contextlib.contextmanager
def _tf32_matmul(enabled: bool):
    """TF32 for the fp32 GEMMs inside (the expand), restoring the global setting after."""
    if not enabled:
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def lora_delta_reference(x_TI: torch.Tensor, a_SRI: torch.Tensor, b_SOR: torch.Tensor,
                         token_slot_T: torch.Tensor) -> torch.Tensor:
    """Token-by-token fp64 loop: ``b[slot_t] @ (a[slot_t] @ x_t)``, zero for ``slot_t == -1``.

    The test reference of :meth:`DenseLoRA.apply`. Args: x_TI ``[T, I]``, a_SRI ``[S, R, I]``,
    b_SOR ``[S, O, R]`` (scaling folded in), token_slot_T ``[T]``. Returns ``[T, O]`` fp32.
    """
    out = torch.zeros(x_TI.shape[0], b_SOR.shape[1], dtype=torch.float32, device=x_TI.device)
    for t, s in enumerate(token_slot_T.tolist()):
        if s >= 0:
            out[t] = b_SOR[s].double() @ (a_SRI[s].double() @ x_TI[t].double())
    return out


def _stacked_factors(pool, path: str, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``A^T [I, S*R]`` and ``B [S*R, O]`` (rows ``rows`` of a replicated ``b``) of
    every slot of one module, read from the pool's buffers."""
    buf = pool.dense_buffers(path)
    S, R, I = buf.a.shape
    b = buf.b if rows is None else buf.b[:, rows[0]:rows[1]]
    return (buf.a.float().reshape(S * R, I).T.contiguous(),
            b.float().permute(0, 2, 1).reshape(S * R, -1).contiguous())


def sync_factor_cache(pool, cache: dict, key) -> None:
    """Bring the cached fp32 factors up to date with the pool when ``key`` changed.

    Every entry covers all slots, so it depends on the pool's buffers only; a changed key
    (another slot assignment, or an explicit invalidation) rewrites the entries **in place**.
    Keeping the tensors' storage is what lets a captured CUDA graph, which holds their
    addresses, serve a replaced adapter without being captured again.
    """
    if cache.get("key") == key:
        return
    for (path, rows), (a, b) in cache.get("factors", {}).items():
        new_a, new_b = _stacked_factors(pool, path, rows)
        a.copy_(new_a)
        b.copy_(new_b)
    for (specs, _), (a_cat, _) in cache.get("groups", {}).items():
        a_cat.copy_(torch.cat([cache["factors"][spec][0] for spec in specs], dim=1))
    cache["key"] = key


class DenseLoRA:
    """The dense-module LoRA of one forward pass: which slot each token uses, and the pool's
    factors as fp32 stacked matrices.

    Built once per forward and shared by every layer, so the token one-hot mask is made once;
    the stacked fp32 factors (``A^T``: ``[I, S*R]``, ``B``: ``[S*R, O]``) are cached across
    forwards in ``cache`` and rewritten in place when ``key`` (the pool's slot assignment)
    changes, see :func:`sync_factor_cache`.
    Decode runs a handful of small kernels per module; caching avoids re-casting and
    re-permuting the factors on every step.
    """

    def __init__(self, pool, token_slot_T: torch.Tensor, cache: dict, key):
        S = pool.config.max_loras
        self.pool = pool
        self.T = int(token_slot_T.shape[0])
        self.S = S
        # One-hot of each token's slot; -1 matches no slot, so base-only tokens get exactly 0.
        self.own_TS1 = (token_slot_T.long()[:, None] == torch.arange(
            S, device=token_slot_T.device)[None, :]).float()[:, :, None]
        sync_factor_cache(pool, cache, key)
        self.cache = cache

    def _factors(self, path: str, rows):
        factors = self.cache.setdefault("factors", {})
        hit = factors.get((path, rows))
        if hit is None:
            hit = factors[(path, rows)] = _stacked_factors(self.pool, path, rows)
        return hit

    def _group(self, specs: tuple, a_dtype: torch.dtype):
        """Stacked ``A^T`` of several modules that read the same input: ``[I, n*S*R]`` in
        ``a_dtype`` (fp32, or the pool's bf16/fp16 for the tensor-core shrink: exact, the pool
        holds ``A`` in that dtype)."""
        groups = self.cache.setdefault("groups", {})
        hit = groups.get((specs, a_dtype))
        if hit is None:
            parts = [self._factors(path, rows) for path, rows in specs]
            hit = (torch.cat([a for a, _ in parts], dim=1).to(a_dtype).contiguous(),
                   [b for _, b in parts])
            groups[(specs, a_dtype)] = hit
        return hit

    def apply_group(self, x_TI: torch.Tensor, items) -> list[torch.Tensor]:
        """Add the LoRA delta of several modules that share the input ``x`` (q, k and v).

        One shrink GEMM for all of them (their A's are stacked), one expand per module.
        Args:
            x_TI: ``[T, I]`` the shared input.
            items: ``(y_TO, path, out_rows)`` per module: its base output ``[T, O]`` (updated
                in place: the fp32 delta is added and rounded once to ``y``'s dtype), its pool
                path, and the rows of a replicated ``b`` this rank computes (or None).
        Returns:
            the updated ``y_TO`` tensors.
        """
        specs = tuple((p, None if r is None else (r.start, r.stop)) for _, p, r in items)
        fast = _tensor_cores(x_TI)
        a_IK, b_list = self._group(specs, x_TI.dtype if fast else torch.float32)
        n = len(items)
        if fast:
            shrink_TK = torch.mm(x_TI, a_IK, out_dtype=torch.float32)
        else:
            shrink_TK = x_TI.float() @ a_IK
        shrink = shrink_TK.view(self.T, n, self.S, -1) * self.own_TS1[:, None]
        out = []
        with _tf32_matmul(fast):
            for j, (y_TO, _, _) in enumerate(items):
                out.append(y_TO.add_(shrink[:, j].reshape(self.T, -1) @ b_list[j]))
        return out

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
        x_TI: ``[T, I]``; w_OI: ``[O, I]`` rank-local base weight; bias_O: ``[O]`` or None.
        lora: this forward's :class:`DenseLoRA`, or None when no token uses an adapter.
        path: module path in the pool (``layers.3.self_attn.q_proj``).
        out_rows: rows of the pool's ``b`` to use when the pool keeps the module replicated but
            this rank computes only some of its outputs (kv heads replicated over TP ranks).
    Returns:
        ``[T, O]`` in ``x_TI.dtype``.
    """
    y_TO = torch.nn.functional.linear(x_TI, w_OI, bias_O)
    if lora is None:
        return y_TO
    return lora.apply(y_TO, x_TI, path, out_rows)
