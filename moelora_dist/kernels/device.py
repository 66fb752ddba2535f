"""Facts of the device a kernel launch sizes its grid by (cached; no sync), whether a CUDA
graph is being captured, and host-to-device copies that never wait for the stream."""

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
