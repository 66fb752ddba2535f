"""Rotary position embeddings of every served family, matching transformers 5 in fp32.

Legend: T tokens, N heads, D head dim, R rotated dims of a head (``rope.rotary_dim``).

- inverse frequencies: the default RoPE or YaRN (``modeling_rope_utils._compute_yarn_parameters``,
  same op order), over ``R`` dims;
- ``cos, sin`` ``[T, R]``: ``cat(freqs, freqs)`` times the attention factor (YaRN's mscale),
  then cast to the model dtype, as every family's ``*RotaryEmbedding.forward`` does;
- rotation of ``[T, N, D]`` queries/keys: rotate-half over the first ``R`` dims, the rest
  passed through (GLM-4.5's partial rotary; ``R == D`` elsewhere; gpt-oss's chunked form is
  the same arithmetic), or DeepSeek-V3's interleaved pairs (``rope_interleave``: pairs
  ``(x0, x1), (x2, x3) ...`` rotated and written back de-interleaved, as transformers'
  ``apply_rotary_pos_emb_interleave`` does to both q and k).
"""

from __future__ import annotations

import math

import torch

from moelora_dist.config.rope import RopeConfig


def _default_inv_freq(theta: float, dim: int, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(
        device=device, dtype=torch.float) / dim))


def _yarn_inv_freq(rope: RopeConfig, device=None) -> torch.Tensor:
    base, dim, factor = rope.theta, rope.rotary_dim, rope.factor
    orig = rope.original_max_positions

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers: prevents a division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)
    return (inv_interpolation * (1 - extrapolation_factor)
            + inv_extrapolation * extrapolation_factor)


class RotaryEmbedding:
    """The inverse frequencies of one model (``[R/2]`` fp32 on ``device``) and its rotation."""

    def __init__(self, rope: RopeConfig, device=None):
        self.rope = rope
        self.inv_freq = (_yarn_inv_freq(rope, device) if rope.kind == "yarn"
                         else _default_inv_freq(rope.theta, rope.rotary_dim, device))
        self.scale = rope.attention_factor

    def cos_sin(self, positions_T: torch.Tensor, dtype: torch.dtype):
        """``cos, sin``: ``[T, R]`` in ``dtype`` for absolute positions ``[T]``."""
        freqs = positions_T.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.scale == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def apply(self, x_TND: torch.Tensor, cos_TR: torch.Tensor,
              sin_TR: torch.Tensor) -> torch.Tensor:
        """Rotate the first ``R`` dims of ``[T, N, D]`` queries or keys (module docstring)."""
        return apply_rotary(x_TND, cos_TR, sin_TR, self.rope.interleave)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x_TND: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor,
                 interleave: bool = False) -> torch.Tensor:
    """``[T, N, D]`` rotated on its first ``R = cos_TR.shape[-1]`` dims (``[T, R]`` tables)."""
    R = cos_TR.shape[-1]
    cos, sin = cos_TR[:, None, :], sin_TR[:, None, :]
    x_rot, x_pass = x_TND[..., :R], x_TND[..., R:]
    if interleave:
        c, s = cos[..., : R // 2], sin[..., : R // 2]
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    else:
        out = x_rot * cos + _rotate_half(x_rot) * sin
    return out if R == x_TND.shape[-1] else torch.cat([out, x_pass], dim=-1)


def rope_tables_for(rope: RopeConfig, max_positions: int, device=None):
    """``cos, sin``: ``[max_positions, R/2]`` fp32, times the attention factor (YaRN), as the
    paged page write and :func:`moelora_dist.models.paged_rope.per_token_tables` read them;
    for the default RoPE over the whole head this is exactly
    :func:`moelora_dist.kernels.paged_attention.naive.rope_tables`."""
    inv_freq = RotaryEmbedding(rope, device).inv_freq
    freqs = torch.arange(max_positions, device=device).float()[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    return cos.contiguous(), sin.contiguous()
