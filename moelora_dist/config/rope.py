"""The rotary embedding of a checkpoint, read from its config.json (no torch here).

Two RoPE types are served, as transformers 5 computes them (``modeling_rope_utils``):

- ``default``: ``inv_freq[i] = theta ** (-2i / dim)``;
- ``yarn``: the inverse frequencies blend interpolation (``/ factor``) and extrapolation over
  the correction range of ``beta_fast`` / ``beta_slow`` rotations (floored / ceiled when
  ``truncate``, the default; gpt-oss sets ``truncate: false``), and cos/sin are multiplied by
  the attention factor: ``attention_factor`` if given, else
  ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are given (DeepSeek-V3),
  else ``mscale(factor) = 0.1 ln(factor) + 1``. DeepSeek-V3's MLA also multiplies its softmax
  scale by ``mscale(factor, mscale_all_dim) ** 2`` (:meth:`RopeConfig.softmax_mscale`).

Where the numbers live: ``rope_parameters`` (transformers 5) or the older ``rope_scaling`` +
``rope_theta``; ``partial_rotary_factor`` in either place (GLM-4.5: absent means 0.5);
``original_max_position_embeddings`` in the parameters, else at top level, else
``max_position_embeddings``; a ``factor`` of None means ``max_positions / original``.
Which dims rotate: ``rotary_dim = head_dim * partial_rotary_factor`` (rotate-half on the first
``rotary_dim`` dims of a head), DeepSeek-V3's ``qk_rope_head_dim``, in interleaved pairs when
``rope_interleave`` is true.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moelora_dist.errors import MoeloraError

ROPE_TYPES = ("default", "yarn")
# transformers' ``default_theta`` of the families that differ from 1e4.
DEFAULT_THETA = {"mixtral": 1e6, "gpt_oss": 150000.0}
# gpt-oss configs may omit rope_parameters: transformers then uses these.
GPT_OSS_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "truncate": False,
                        "original_max_position_embeddings": 4096}


class RopeConfigError(MoeloraError):
    """A RoPE configuration the runner does not implement; the message names the field."""


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """``0.1 * mscale * ln(scale) + 1`` for ``scale > 1``, else 1 (transformers' get_mscale)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeConfig:
    """Parsed RoPE parameters. ``rotary_dim``: dims of a head that rotate (even)."""

    theta: float
    rotary_dim: int
    kind: str = "default"
    interleave: bool = False
    factor: float = 1.0
    original_max_positions: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor_given: float | None = None
    truncate: bool = True

    @property
    def attention_factor(self) -> float:
        """What cos and sin are multiplied by (1 for the default RoPE)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor_given is not None:
            return float(self.attention_factor_given)
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor,
                                                                       self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def softmax_mscale(self) -> float:
        """DeepSeek-V3's extra softmax scale factor (``yarn_apply_mscale``): the squared
        ``mscale(factor, mscale_all_dim)`` when the RoPE is scaled and ``mscale_all_dim`` set."""
        if self.kind == "default" or not self.mscale_all_dim:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2


def rope_params_of(raw: dict) -> dict:
    """The RoPE parameter dict of a config: ``rope_parameters``, else ``rope_scaling`` (with
    ``rope_theta`` from top level), else gpt-oss's default YaRN; ``{}`` for plain RoPE."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if not params and raw.get("model_type") == "gpt_oss":
        params = dict(GPT_OSS_DEFAULT_ROPE)
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    return params


def parse_rope(raw: dict, head_dim: int, *, default_partial: float = 1.0,
               rotary_dim: int | None = None, interleave: bool = False) -> RopeConfig:
    """Read the RoPE of ``raw`` (see the module docstring).

    Args:
        head_dim: the per-head dim the YaRN correction range is computed over (transformers
            uses ``config.head_dim``: DeepSeek-V3 sets it to ``qk_rope_head_dim``).
        default_partial: ``partial_rotary_factor`` when the config has none (GLM-4.5: 0.5).
        rotary_dim: the rotated dims when the family fixes them (MLA); else from the factor.
    """
    params = rope_params_of(raw)
    kind = params.get("rope_type") or "default"
    if kind not in ROPE_TYPES:
        raise RopeConfigError(f"rope_type {kind!r} is not supported; implemented: "
                              f"{', '.join(ROPE_TYPES)}")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:  # transformers falls back to the class's default_theta
        theta = DEFAULT_THETA.get(raw.get("model_type"), 1e4)
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    partial = default_partial if partial is None else float(partial)
    if rotary_dim is None:
        rotary_dim = int(head_dim * partial)
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise RopeConfigError(f"rotary dims {rotary_dim} (head_dim {head_dim} x "
                              f"partial_rotary_factor {partial}) must be even, positive and at "
                              "most head_dim")
    if kind == "default":
        return RopeConfig(theta=float(theta), rotary_dim=rotary_dim, interleave=interleave)
    orig = params.get("original_max_position_embeddings",
                      raw.get("original_max_position_embeddings",
                              raw.get("max_position_embeddings")))
    if orig is None:
        raise RopeConfigError("a YaRN RoPE needs original_max_position_embeddings (or "
                              "max_position_embeddings) in config.json")
    factor = params.get("factor")
    if factor is None:
        max_pos = raw.get("max_position_embeddings")
        if max_pos is None:
            raise RopeConfigError("a YaRN RoPE needs 'factor' or max_position_embeddings")
        factor = max_pos / orig
    return RopeConfig(
        theta=float(theta), rotary_dim=rotary_dim, kind=kind, interleave=interleave,
        factor=float(factor), original_max_positions=int(orig),
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow")
                                                                         or 1),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor_given=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)))
