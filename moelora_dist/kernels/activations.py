"""The activations of the gated MLP ``h = act(gate, up)`` in PyTorch, keyed like the
kernels' ids in :data:`moelora_dist.kernels.constants.ACTIVATION_IDS` (one registry of names).

``silu`` and ``gelu`` are ``act(gate) * up``; ``swiglu_oai`` is gpt-oss's clamped SwiGLU
(``GptOssExperts._apply_gate``, same op order): ``g = min(gate, limit)``,
``u = clamp(up, -limit, limit)``, ``h = (u + 1) * (g * sigmoid(alpha * g))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelora_dist.kernels.constants import ACTIVATION_IDS, Activation, as_activation

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda t: F.gelu(t, approximate="tanh"),
}
assert set(ACTIVATIONS) | {"swiglu_oai"} == set(ACTIVATION_IDS)


def glu(activation: "str | Activation", gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``h`` from the gate and up halves (same shape, same dtype)."""
    act = as_activation(activation)
    if act.name == "swiglu_oai":
        g = gate.clamp(min=None, max=act.limit)
        u = up.clamp(min=-act.limit, max=act.limit)
        return (u + 1) * (g * torch.sigmoid(g * act.alpha))
    return ACTIVATIONS[act.name](gate) * up
