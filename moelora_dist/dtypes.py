"""The one table of dtype names a user may give (``--dtype``), and its check."""

from __future__ import annotations

import torch

from moelora_dist.errors import OptionError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def dtype_of(name: str, allowed: tuple[str, ...] | None = None) -> torch.dtype:
    """``torch.dtype`` of a name in :data:`DTYPES` (and in ``allowed`` when given)."""
    names = allowed or tuple(DTYPES)
    if name not in names:
        raise OptionError(f"dtype {name!r} is not one of {', '.join(names)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
