"""Numbers shared by the Triton kernels, their launchers and their references.

This module imports neither torch nor triton, so a reference (``naive.py``) and a kernel
file read the same values from one place.
"""

from __future__ import annotations

from dataclasses import dataclass

# A slot id larger than any real one: ends the loop over the slots of a block.
NO_SLOT = 2147483647

# Activation of the gated MLP ``h = act(gate) * up``. The id is a kernel constexpr.
# gelu: the tanh approximation. swiglu_oai: gpt-oss's clamped SwiGLU,
# ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.
ACTIVATION_IDS = {"silu": 0, "gelu": 1, "swiglu_oai": 2}


@dataclass(frozen=True)
class Activation:
    """An activation with its constants (only ``swiglu_oai`` reads ``alpha`` / ``limit``)."""

    name: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0


def as_activation(activation: "str | Activation") -> Activation:
    """``Activation`` of a name or an ``Activation``; ``ValueError`` for an unknown name."""
    act = activation if isinstance(activation, Activation) else Activation(activation)
    check_activation(act.name)
    return act

# Align modes (the key function of ``align/kernel.py``).
ALIGN_MODE_BASE = 0  # bucket = expert; sub = effective slot + 1 when sorting by slot
ALIGN_MODE_LORA = 1  # bucket = slot * E + expert (pairs), slot * E (tokens of shared-A slots)
ALIGN_MODE_LORA_PAIRS = 2  # bucket = slot * E + expert for every pair with an enabled slot
ALIGN_MODES = {"base": ALIGN_MODE_BASE, "lora": ALIGN_MODE_LORA,
               "lora_pairs": ALIGN_MODE_LORA_PAIRS}


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_r(max_rank: int) -> int:
    """Padded rank of the LoRA tiles: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, next_power_of_2(max(int(max_rank), 1)))


def check_activation(name: "str | Activation") -> int:
    """The kernel id of activation ``name`` (or of an ``Activation``); ``ValueError`` naming
    the known ones."""
    if isinstance(name, Activation):
        name = name.name
    if name not in ACTIVATION_IDS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATION_IDS)}")
    return ACTIVATION_IDS[name]

# Block-FP8: columns per weight scale and per activation scale (one group of a token's
# activations is quantized with one scale); e4m3's largest finite value; the floor of a
# group's amax (an all-zero group gets this scale instead of dividing by zero).
FP8_GROUP = 128
FP8_MAX = 448.0
FP8_AMAX_FLOOR = 1e-10
