"""Shared-outer detection, per adapter and per MoE layer.

"Outer" factors are the ones on the layer's boundary: ``gate.a``, ``up.a`` (input side) and
``down.b`` (output side). A shared-outer layer keeps one copy of them (expert dim 1); the inner
factors (``gate.b``, ``up.b``, ``down.a``) are always per expert.

``force`` (``load_adapter(force_shared_outer=...)``):

* ``None`` (auto): a factor stored with one copy stays shared; a factor stored per expert whose
  E copies are bitwise identical is collapsed to one copy (exact, and saves E-1 copies in the
  pool); anything else stays per expert. Decided independently for every layer.
* ``True``: every outer factor must end up shared: per-expert copies must be identical
  (else :class:`AdapterError` naming the layer, projection and first differing expert).
* ``False``: every factor is expanded to E copies (a pool without shared-outer support).

Because the pool has one "shared" flag for the packed gate_up A, ``gate.a`` and ``up.a`` end
up either both shared or both per expert (a lone shared one is expanded). Inner factors stored
with one copy are expanded to E: the pool stores them per expert.
"""

from __future__ import annotations

import torch

from moelora_dist.adapters.canonical import LoRAFactors, MoELayerLoRA
from moelora_dist.adapters.errors import AdapterError


def _expand(t: torch.Tensor, E: int) -> torch.Tensor:
    return t if t.shape[0] == E else t.expand(E, *t.shape[1:]).contiguous()


def _collapse(t: torch.Tensor) -> torch.Tensor | int:
    """``t[:1]`` when every expert's copy equals expert 0's, else the first differing expert."""
    if t.shape[0] == 1:
        return t
    for e in range(1, t.shape[0]):
        if not torch.equal(t[e], t[0]):
            return e
    return t[:1].clone()


def apply_shared_outer(moe: MoELayerLoRA, layer: int, force: bool | None,
                       where: str) -> MoELayerLoRA:
    """Normalize the sharing of one layer's factors (module docstring); returns a new object."""
    E = moe.num_experts
    proj = moe.projections()
    shared_a = moe.gate_up_shared_a
    new: dict[str, LoRAFactors] = {}
    for name, f in proj.items():
        inner = f.b if name in ("gate", "up") else f.a
        inner = _expand(inner, E)
        outer = f.a if name in ("gate", "up") else f.b
        if name == "up" and shared_a:
            outer = new["gate"].a  # one A for gate and up: decide once, keep the identity
        elif force is False:
            outer = _expand(outer, E)
        else:
            got = _collapse(outer)
            if isinstance(got, int):
                if force:
                    side = "A" if name != "down" else "B"
                    raise AdapterError(
                        f"{where}: layer {layer}: force_shared_outer=True but the {name} "
                        f"lora_{side} of expert {got} differs from expert 0's (max abs diff "
                        f"{(outer[got] - outer[0]).abs().max().item():.3g}); this adapter is not "
                        "shared-outer, load it with force_shared_outer=None or False")
            else:
                outer = got
        if name in ("gate", "up"):
            new[name] = LoRAFactors(a=outer, b=inner, scaling=f.scaling)
        else:
            new[name] = LoRAFactors(a=inner, b=outer, scaling=f.scaling)
    g, u = new.get("gate"), new.get("up")
    if g is not None and u is not None and g.a is not u.a and g.a_shared != u.a_shared:
        new["gate"] = LoRAFactors(a=_expand(g.a, E), b=g.b, scaling=g.scaling)
        new["up"] = LoRAFactors(a=_expand(u.a, E), b=u.b, scaling=u.scaling)
    return MoELayerLoRA(num_experts=E, **new)
