"""Align: sort (token, k) pairs (and tokens) into blocks of one expert / virtual expert."""

from moelora_dist.kernels.align.common import Alignment, max_rows
from moelora_dist.kernels.align.ops import align_base_and_lora, align_items

__all__ = ["Alignment", "align_base_and_lora", "align_items", "max_rows"]
