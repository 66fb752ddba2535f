"""Checkpoint key names -> what they hold. The one place that knows the naming conventions.

Every LoRA key ends in ``.lora_A.weight`` or ``.lora_B.weight``. The module part (``m``) is the
key without the ``base_model.model.`` prefix PEFT adds (kept as is for PEFT's pattern
matching) and is classified, in this order:

1. **expert parameter** (PEFT ``target_parameters`` on transformers-5 3-D experts):
   ``<p>layers.{l}.{mlp|block_sparse_moe}.experts[.base_layer]*`` — the number of
   ``base_layer.`` hops is the wrapper depth that tells nested parameters apart;
2. **expert projection**: ``<p>layers.{l}.{mlp|block_sparse_moe}.experts[.{e}].{proj}`` with
   ``proj`` in ``gate_proj up_proj down_proj w1 w3 w2 gate_up_proj`` (``w1`` gate, ``w3`` up,
   ``w2`` down); with ``.{e}`` one 2-D tensor per expert, without it one stacked tensor for
   all experts (3-D ``[E or 1, ...]``) or, 2-D, one copy shared by all experts;
3. anything else under ``.experts.``: unknown (never silently treated as dense);
4. **dense** (attention, dense MLP, ...): path = ``m`` with every leading ``model.`` removed,
   e.g. ``layers.3.self_attn.q_proj`` or ``lm_head``.

Keys that are not LoRA factors at all (DoRA magnitudes, biases, ``modules_to_save`` copies,
embedding LoRA) are unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PEFT_PREFIX = "base_model.model."
PROJ_ALIASES = {
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up",
    "down_proj": "down", "w2": "down",
    "gate_up_proj": "gate_up",
}

_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
_EXPERTS = r"(?P<experts>(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts)"
_PARAM = re.compile(rf"^{_EXPERTS}(?P<wrap>(?:\.base_layer)*)$")
_PROJ = re.compile(rf"^{_EXPERTS}(?:\.(?P<expert>\d+))?\.(?P<proj>{'|'.join(PROJ_ALIASES)})$")


@dataclass(frozen=True)
class ParsedKey:
    """One checkpoint key. ``kind`` is ``"param"``, ``"expert"``, ``"dense"`` or ``"unknown"``."""

    key: str
    kind: str
    module: str = ""  # the module name PEFT saw (pattern matching)
    factor: str = ""  # "A" or "B"
    layer: int = -1
    expert: int | None = None  # per-expert keys only
    proj: str = ""  # gate / up / down / gate_up (expert keys)
    proj_name: str = ""  # the name as written (gate_proj, w1, ...)
    depth: int = 0  # base_layer hops (param keys)
    experts_module: str = ""  # "<p>layers.{l}.mlp.experts" (param and expert keys)
    path: str = ""  # normalized dense path


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def dense_path(module: str) -> str:
    """Normalized dense module path: every leading ``model.`` removed (module docstring)."""
    while module.startswith("model."):
        module = module[len("model."):]
    return module


def parse_key(key: str) -> ParsedKey:
    """Classify one checkpoint key (see the module docstring for the grammar)."""
    m = _FACTOR.match(strip_peft_prefix(key))
    if m is None:
        return ParsedKey(key, "unknown")
    module, factor = m["module"], m["factor"]
    if p := _PARAM.match(module):
        return ParsedKey(key, "param", module, factor, int(p["layer"]),
                         depth=p["wrap"].count(".base_layer"), experts_module=p["experts"])
    if p := _PROJ.match(module):
        expert = int(p["expert"]) if p["expert"] is not None else None
        return ParsedKey(key, "expert", module, factor, int(p["layer"]), expert=expert,
                         proj=PROJ_ALIASES[p["proj"]], proj_name=p["proj"],
                         experts_module=p["experts"])
    if re.search(r"(^|\.)experts(\.|$)", module):
        return ParsedKey(key, "unknown", module, factor)
    layer = re.search(r"(?:^|\.)layers\.(\d+)\.", module)
    return ParsedKey(key, "dense", module, factor, int(layer[1]) if layer else -1,
                     path=dense_path(module))
