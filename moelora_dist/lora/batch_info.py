"""Per-batch adapter info: built once per forward, read by every LoRA layer of it.

Legend: B requests, T tokens, S slots. Requests are contiguous token segments: request ``b``
owns tokens ``[seg_indptr[b], seg_indptr[b+1])`` and uses slot ``req_to_slot[b]`` (``-1``:
base model only).

:func:`build_batch_info` is the one builder. Its ``backend`` picks the kernel family's
reference (``"torch"``, :mod:`moelora_dist.kernels.batch_info.naive`) or its one-launch
Triton kernel (``"triton"``); by default Triton on CUDA tensors and the reference elsewhere.
Eager steps and captured CUDA-graph steps call the same builder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelora_dist.kernels.batch_info import naive

BACKENDS = ("torch", "triton")


@dataclass
class BatchInfo:
    """What the LoRA layers of one forward read.

    ``token_slot_T``: ``[T]`` int32 slot per token, ``-1`` = no adapter (also for a slot of
    rank 0 or a request of length 0).
    ``slot_enabled_S``: ``[S]`` bool, some request uses the slot and its rank is > 0.
    ``num_lora_tokens``: host int, or None when not known on the host (a CUDA-graph step, or
    a build without ``sync``); 0 lets the layers leave the LoRA path out entirely.
    ``num_lora_tokens_dev``: ``[1]`` int32 on the device, the same count (always set by the
    builder; None for a hand-made info).
    ``max_rank``: host int, the largest rank of the slots the requests name, or None when not
    known on the host; the MoE kernels size their rank tiles from it (a batch of rank-16
    adapters in a rank-64 pool runs 16-wide tiles). Never below a used slot's rank.
    """

    token_slot_T: torch.Tensor
    slot_enabled_S: torch.Tensor
    num_lora_tokens: int | None = None
    num_lora_tokens_dev: torch.Tensor | None = None
    max_rank: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_slot_T.shape[0])

    def any_lora(self) -> bool:
        """Whether some token has an adapter (a host sync when the host count is unknown)."""
        if self.num_lora_tokens is not None:
            return self.num_lora_tokens > 0
        return bool(self.slot_enabled_S.any())


def build_batch_info(seg_indptr_B1: torch.Tensor, req_to_slot_B: torch.Tensor,
                     slot_rank_S: torch.Tensor, *, backend: str | None = None,
                     validate: bool = True, num_tokens: int | None = None,
                     num_lora_tokens: int | None = None,
                     max_rank: int | None = None) -> BatchInfo:
    """Expand per-request slots to per-token slots and mark the slots in use.

    Args:
        seg_indptr_B1: ``[B+1]`` int token offsets; req_to_slot_B: ``[B]`` int, ``-1`` = base.
        slot_rank_S: ``[S]`` int32 rank of each slot (0: empty), e.g. ``pool.slot_rank_S``.
        backend: ``"torch"`` or ``"triton"``; None: Triton for CUDA tensors, else torch.
        validate: check the segments and slots first (a host sync; raises ``ValueError``).
        num_tokens: ``T`` when the caller knows it (spares the Triton path a sync).
        num_lora_tokens: the host count when the caller knows it (a CUDA-graph step knows
            it from its request slots); otherwise it is read back only when ``validate``
            (which syncs anyway), else left None.
        max_rank: the largest rank of the slots in ``req_to_slot_B`` when the caller knows it;
            otherwise computed only when ``validate``, else left None (the kernels then size
            their rank tiles for the pool's max rank).
    """
    backend = backend or ("triton" if seg_indptr_B1.is_cuda else "torch")
    if backend not in BACKENDS:
        raise ValueError(f"unknown batch-info backend {backend!r}; use one of {BACKENDS}")
    if validate:
        naive.check_segments(seg_indptr_B1, req_to_slot_B, int(slot_rank_S.numel()))
    if backend == "triton":
        from moelora_dist.kernels.batch_info import ops  # Triton is optional off Linux x86-64

        token_slot_T, slot_enabled_S, count = ops.batch_info(
            seg_indptr_B1, req_to_slot_B, slot_rank_S, num_tokens)
    else:
        token_slot_T, slot_enabled_S, count = naive.batch_info(
            seg_indptr_B1, req_to_slot_B, slot_rank_S, num_tokens)
    if num_lora_tokens is None and validate:
        num_lora_tokens = int(count)
    if max_rank is None and validate:
        used = req_to_slot_B[req_to_slot_B >= 0].long().to(slot_rank_S.device)
        max_rank = int(slot_rank_S[used].max()) if used.numel() else 0
    return BatchInfo(token_slot_T, slot_enabled_S, num_lora_tokens, count, max_rank)
