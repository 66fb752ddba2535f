"""MXFP4 expert weights (published gpt-oss checkpoints), dequantized at load time.

Legend: E experts, O output rows of a projection, G groups of 32 inputs, C = G * 32 inputs.

The checkpoint stores each projection as ``{name}_blocks [E, O, G, 16]`` uint8 (two FP4 e2m1
codes per byte, low nibble first) and ``{name}_scales [E, O, G]`` uint8 (a power-of-two
exponent per group of 32 inputs, biased by 127): ``w[e, o, 32 g + j] = FP4[code] * 2 **
(scale - 127)``. That is transformers' ``convert_moe_packed_tensors`` (before its final
transpose to gpt-oss's in-memory ``[E, C, O]``), so ``[E, O, C]`` is directly the layout the
kernels read once the gate/up rows are de-interleaved.

Why dequantize instead of refusing: the LoRA and base kernels here read bf16 experts, and
users want the published checkpoints. The cost is memory: bf16 takes 3.76x the bytes of
MXFP4 (16 bits against 4 + 8/32); :func:`mxfp4_note` says how much, once per model. Every
value is exact in bf16 (an FP4 value times a power of two).
"""

from __future__ import annotations

import torch

from moelora_dist.files.paths import fail

# The 16 FP4 (e2m1) values, by code (transformers' FP4_VALUES).
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32  # inputs per scale


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """``blocks [..., G, 16]`` uint8 and ``scales [..., G]`` uint8 -> ``[..., G * 32]``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and "
                         f"{scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales "
                         f"{tuple(scales.shape)} (expected [..., G, 16] and [..., G])")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(*blocks.shape[:-1], GROUP, dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    exp = scales.to(torch.int32) - 127
    out = torch.ldexp(out, exp.unsqueeze(-1).to(out.device))
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * GROUP)


def read_mxfp4(reader, name: str, experts: slice, rows: slice, cols: tuple[int, int],
               full_shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Dequantize ``name``'s ``[experts, rows, cols[0]:cols[1]]`` from ``{name}_blocks`` /
    ``{name}_scales``; ``full_shape`` ``(E, O, C)`` is what the config implies.

    Only the 32-input groups that cover ``cols`` are read (a rank's slice of ``I``).
    """
    E, O, C = full_shape
    b_key, s_key = f"{name}_blocks", f"{name}_scales"
    want_b, want_s = [E, O, C // GROUP, GROUP // 2], [E, O, C // GROUP]
    if C % GROUP or reader.shape(b_key) != want_b or reader.shape(s_key) != want_s:
        raise fail(reader.what, reader.path,
                   f"MXFP4 tensors {b_key!r} {reader.shape(b_key)} / {s_key!r} "
                   f"{reader.shape(s_key)} do not match the config: expected {want_b} and "
                   f"{want_s} (inputs C={C} in groups of {GROUP})")
    lo, hi = cols
    g0, g1 = lo // GROUP, -(-hi // GROUP)
    blocks = reader.get_raw(b_key, experts, rows, slice(g0, g1))
    scales = reader.get_raw(s_key, experts, rows, slice(g0, g1))
    w = dequantize_mxfp4(blocks, scales, dtype)
    return w[..., lo - g0 * GROUP:hi - g0 * GROUP].contiguous()


def mxfp4_note(num_values: int, dtype: torch.dtype) -> str:
    """What dequantizing ``num_values`` expert weights to ``dtype`` costs, for the log."""
    stored = num_values * (0.5 + 1 / GROUP)
    now = num_values * torch.empty((), dtype=dtype).element_size()
    return (f"MXFP4 experts dequantized to {str(dtype).replace('torch.', '')} at load: "
            f"{now / 2**30:.2f} GiB on this rank instead of {stored / 2**30:.2f} GiB as MXFP4 "
            f"({now / stored:.2f}x)")
