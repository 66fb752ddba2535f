"""The Triton interpreter's fp32/fp16 -> e4m3 cast, done right.

The Triton 3.9 interpreter loads, stores and multiplies e4m3 correctly, but its fp32 -> e4m3
cast rounds half up on the mantissa bits and drops the carry into the exponent (31.1 -> 16,
where the GPU and torch give 32; about 2% of random values). The FP8 kernels quantize every
activation tile with that cast, so under the interpreter their outputs miss the reference by
up to ~0.1 of the largest value, and the tuner's check (``tuning/measure.py``) would refuse
every FP8 candidate. :func:`fixed_convert` replaces that one conversion with torch's (round to
nearest even, as the GPU's ``cvt.rn.satfinite``); the kernels are unchanged. Used by the
interpreter tests and by ``tune-kernels --device cpu``; never on a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

_FIXED = "_moelora_e4m3_fixed"


def fixed_convert(real):
    """The interpreter's ``_convert_float`` with fp32 and fp16 -> e4m3 done by torch, every
    other conversion by ``real``."""
    import triton.language as tl

    def convert(data, src, dst, rounding_mode):
        if dst == tl.float8e4nv and src in (tl.float32, tl.float16):
            t = torch.from_numpy(np.ascontiguousarray(data).view(
                np.float32 if src == tl.float32 else np.float16).copy())
            return t.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(data.shape)
        return real(data, src, dst, rounding_mode)

    setattr(convert, _FIXED, True)
    return convert


def fix_e4m3_cast(setattr_=setattr) -> None:
    """Install :func:`fixed_convert` in the interpreter (once; ``setattr_``: e.g. pytest's
    ``monkeypatch.setattr``, to undo it after a test)."""
    from triton.runtime import interpreter

    if not getattr(interpreter._convert_float, _FIXED, False):
        setattr_(interpreter, "_convert_float", fixed_convert(interpreter._convert_float))
