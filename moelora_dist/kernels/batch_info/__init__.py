"""Batch info on the device: per-token slot and per-slot enabled flags, one launch."""

from moelora_dist.kernels.batch_info.ops import compute_batch_info

__all__ = ["compute_batch_info"]
