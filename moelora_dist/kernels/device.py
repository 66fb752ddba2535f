"""Facts of the device a kernel launch sizes its grid by (cached; no sync) and the split of a K
axis over programs that fills it, whether a CUDA graph is being captured, and host-to-device
copies that never wait for the stream."""

from __future__ import annotations

import functools

import torch

CPU_SMS = 16  # "SMs" assumed off CUDA (the Triton interpreter), so CPU tests split too


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``CPU_SMS`` off CUDA)."""
    if device.type != "cuda":
        return CPU_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def splits_to_fill(tiles: int, k_steps: int, sms: int, min_steps: int,
                   max_splits: int | None = None, per_sm: int = 2) -> int:
    """Programs along K per tile so that a launch of ``tiles`` tiles has about ``per_sm``
    programs per SM, each looping over at least ``min_steps`` of the ``k_steps`` K steps (and
    at most ``max_splits``); 1 where the tiles fill the GPU already."""
    cap = k_steps // min_steps if max_splits is None else min(k_steps // min_steps, max_splits)
    return max(1, min(_cdiv(per_sm * sms, max(tiles, 1)), cap))


def split_columns(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """``(columns per split, a multiple of block_k; number of splits)`` of a K axis of ``k``
    cut into at most ``split_k`` programs (none of them past the end)."""
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    k_per_split = _cdiv(_cdiv(k, split_k), block_k) * block_k
    return k_per_split, _cdiv(k, k_per_split)


def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph (never off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """CPU tensor ``t`` on ``device``. On CUDA through pinned memory and without waiting: a
    plain copy from pageable memory waits for the whole stream, i.e. for a step in flight
    (the engine plans the next step while the device runs one)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
