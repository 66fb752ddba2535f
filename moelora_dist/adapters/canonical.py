"""The one internal form every adapter checkpoint is normalized to (docs/design.md section 5).

Legend: E experts, H hidden, I expert intermediate, r LoRA rank. Every factor keeps the
orientation of the math in docs/design.md section 1 (``delta W = scaling * B @ A``):

    gate.a: [Ea, r, H]   gate.b: [Eb, I, r]
    up.a:   [Ea, r, H]   up.b:   [Eb, I, r]
    down.a: [Ea, r, I]   down.b: [Eb, H, r]

``Ea`` / ``Eb`` is either ``E`` (per expert) or ``1`` (one copy shared by all experts:
"shared-outer" adapters store ``gate.a``, ``up.a`` and ``down.b`` this way). The tensors are
full (unsliced, every expert); :mod:`moelora_dist.lora` cuts the rank-local part.

When gate and up share one ``A`` (what PEFT ``target_parameters`` writes for a fused
``gate_up_proj``), ``gate.a is up.a`` — the same tensor object — and ``gate_up_shared_a`` is
True. Scaling is kept per projection (``rank_pattern`` / ``alpha_pattern`` may differ).
This module knows nothing of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MOE_PROJECTIONS = ("gate", "up", "down")


@dataclass
class LoRAFactors:
    """One LoRA pair ``delta = scaling * b @ a``, stacked over experts (see module legend)."""

    a: torch.Tensor  # [Ea, r, in]
    b: torch.Tensor  # [Eb, out, r]
    scaling: float
    # Filled when the values are checked (moelora_dist.adapters.validate.check_values):
    max_abs_a: float | None = None  # largest |a|
    max_abs_b: float | None = None  # largest |b| (before scaling)
    delta_bound: float | None = None  # bound on every entry of scaling * b @ a

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def in_dim(self) -> int:
        return int(self.a.shape[2])

    @property
    def out_dim(self) -> int:
        return int(self.b.shape[1])

    @property
    def a_shared(self) -> bool:
        return self.a.shape[0] == 1

    @property
    def b_shared(self) -> bool:
        return self.b.shape[0] == 1

    def delta(self, expert: int) -> torch.Tensor:
        """``[out, in]`` weight delta of one expert, in fp32 (reference use only)."""
        a = self.a[0 if self.a_shared else expert].float()
        b = self.b[0 if self.b_shared else expert].float()
        return self.scaling * (b @ a)


@dataclass
class MoELayerLoRA:
    """The expert LoRA of one MoE layer. A projection the adapter does not target is None."""

    num_experts: int
    gate: LoRAFactors | None = None
    up: LoRAFactors | None = None
    down: LoRAFactors | None = None

    @property
    def gate_up_shared_a(self) -> bool:
        return self.gate is not None and self.up is not None and self.gate.a is self.up.a

    @property
    def shared_outer(self) -> bool:
        """True when every targeted outer factor (gate/up ``a``, down ``b``) has one copy."""
        outer = [f.a for f in (self.gate, self.up) if f is not None]
        if self.down is not None:
            outer.append(self.down.b)
        return bool(outer) and all(t.shape[0] == 1 for t in outer)

    def projections(self) -> dict[str, LoRAFactors]:
        return {p: f for p in MOE_PROJECTIONS if (f := getattr(self, p)) is not None}

    @property
    def max_rank(self) -> int:
        return max((f.rank for f in self.projections().values()), default=0)


@dataclass
class CanonicalAdapter:
    """A whole adapter, normalized.

    ``moe``: MoE layer index -> :class:`MoELayerLoRA`.
    ``dense``: module path (e.g. ``"layers.3.self_attn.q_proj"``, ``"layers.0.mlp.up_proj"``)
    -> :class:`LoRAFactors` with expert dims of 1 (``a: [1, r, in]``, ``b: [1, out, r]``).
    ``format``: a short name of the checkpoint layout it came from, for ``inspect-adapter``.
    ``layer_formats``: MoE layer index -> the layout that layer was read from (formats may
    differ per layer).
    """

    name: str
    moe: dict[int, MoELayerLoRA] = field(default_factory=dict)
    dense: dict[str, LoRAFactors] = field(default_factory=dict)
    format: str = "unknown"
    source: str = ""
    config: dict = field(default_factory=dict)
    layer_formats: dict[int, str] = field(default_factory=dict)
    values_checked: bool = False  # every factor passed check_values (finite, bounded)

    def factors(self):
        """``(where, key, LoRAFactors)`` of every factor pair: ``where`` names it in errors,
        ``key`` is ``(layer, projection)`` or ``(path,)``."""
        for layer, moe in sorted(self.moe.items()):
            for proj, f in moe.projections().items():
                yield f"MoE layer {layer} {proj}", (layer, proj), f
        for path, f in sorted(self.dense.items()):
            yield f"module {path!r}", (path,), f

    @property
    def max_rank(self) -> int:
        ranks = [m.max_rank for m in self.moe.values()]
        ranks += [f.rank for f in self.dense.values()]
        return max(ranks, default=0)
