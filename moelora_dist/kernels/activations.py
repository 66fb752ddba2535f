"""The activations of ``h = act(gate) * up`` in PyTorch, keyed like the kernels' ids in
:data:`moelora_dist.kernels.constants.ACTIVATION_IDS` (one registry of names)."""

from __future__ import annotations

import torch.nn.functional as F

from moelora_dist.kernels.constants import ACTIVATION_IDS

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda t: F.gelu(t, approximate="tanh"),
}
assert set(ACTIVATIONS) == set(ACTIVATION_IDS)
