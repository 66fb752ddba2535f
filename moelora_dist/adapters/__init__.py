"""Adapter checkpoints: formats, name normalization, shared-outer detection, validation.

``load_adapter(dir, model_config=..., max_rank=..., strict=True, force_shared_outer=None)``
returns a :class:`CanonicalAdapter`; the accepted layouts are listed in ``docs/adapters.md``.
This package knows nothing of ranks or layouts.
"""

from moelora_dist.adapters.canonical import (
    MOE_PROJECTIONS,
    CanonicalAdapter,
    LoRAFactors,
    MoELayerLoRA,
)
from moelora_dist.adapters.errors import AdapterError
from moelora_dist.adapters.loader import load_adapter

__all__ = [
    "MOE_PROJECTIONS",
    "AdapterError",
    "CanonicalAdapter",
    "LoRAFactors",
    "MoELayerLoRA",
    "load_adapter",
]
