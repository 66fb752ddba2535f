"""Facts of the device a kernel launch sizes its grid by (cached; no sync)."""

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
