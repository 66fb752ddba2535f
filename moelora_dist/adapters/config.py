"""Parsing of ``adapter_config.json`` (PEFT LoRA) and of the model's ``config.json`` dims.

Rank and alpha of a module follow PEFT's own rule (``peft.utils.other.get_pattern_key``,
peft 0.21): a ``rank_pattern`` / ``alpha_pattern`` key ``k`` applies to module name ``m`` when
``re.match(rf"(.*\\.)?({k})$", m)``; the first matching key in the dict's order wins, else
``r`` / ``lora_alpha``. ``m`` is the module's name inside the base model, i.e. the checkpoint
key without ``base_model.model.`` and without ``.lora_A.weight``; for a ``target_parameters``
LoRA it is the parameter's name (``model.layers.0.mlp.experts.gate_up_proj``). The scale is
``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from moelora_dist.adapters.errors import AdapterError
from moelora_dist.config.families import (INTERLEAVED_EXPERTS, attention_dims, family_of,
                                          layer_linear_shapes, moe_intermediate_of,
                                          moe_layer_indices, num_experts_of)
from moelora_dist.config.model import text_config

# PEFT options that change the math in ways the canonical form (plain B @ A) cannot carry.
_UNSUPPORTED_TRUE = ("use_dora", "fan_in_fan_out", "use_qalora", "use_bdlora")


@dataclass
class LoRAConfigView:
    """What the loader needs from ``adapter_config.json``."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    target_parameters: list = field(default_factory=list)
    peft_version: tuple[int, ...] | None = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict, source: str) -> "LoRAConfigView":
        """Validate and read a parsed ``adapter_config.json`` (``source`` names it in errors)."""
        if not isinstance(cfg, dict):
            raise AdapterError(f"{source}: expected a JSON object, found a JSON "
                               f"{type(cfg).__name__}")
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"{source}: peft_type is {cfg.get('peft_type')!r}; only LORA "
                               "adapters are supported")
        for opt in _UNSUPPORTED_TRUE:
            if cfg.get(opt):
                raise AdapterError(f"{source}: {opt}=true is not supported (the canonical form "
                                   f"is a plain scaled B @ A); re-export the adapter without {opt}")
        if cfg.get("lora_bias") or cfg.get("bias", "none") not in ("none", None):
            raise AdapterError(f"{source}: LoRA biases (lora_bias / bias={cfg.get('bias')!r}) are "
                               "not supported; train with bias='none'")
        if "r" not in cfg:
            raise AdapterError(f"{source}: missing field 'r' (the LoRA rank)")
        r = cfg["r"]
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise AdapterError(f"{source}: r={r!r}; the LoRA rank must be a positive integer")
        alpha = _number(cfg.get("lora_alpha", r), "lora_alpha", source)
        rank_pattern = _patterns(cfg, "rank_pattern", source)
        for k, v in rank_pattern.items():
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise AdapterError(f"{source}: rank_pattern[{k!r}]={v!r}; ranks must be positive "
                                   "integers (rank 0 is not a LoRA)")
        alpha_pattern = {k: _number(v, f"alpha_pattern[{k!r}]", source)
                         for k, v in _patterns(cfg, "alpha_pattern", source).items()}
        targets = cfg.get("target_parameters") or []
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise AdapterError(f"{source}: target_parameters={targets!r}; expected a list of "
                               "parameter names")
        rslora = cfg.get("use_rslora", False)
        if not isinstance(rslora, bool):
            raise AdapterError(f"{source}: use_rslora={rslora!r}; expected true or false")
        return cls(
            r=r,
            lora_alpha=alpha,
            use_rslora=rslora,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            target_parameters=list(targets),
            peft_version=parse_version(cfg.get("peft_version")),
            raw=dict(cfg),
        )

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """``(r, alpha)`` of module name ``module`` under PEFT's pattern rule (module docstring)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return int(r), float(alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets_parameter(self, module: str, param: str) -> bool:
        """PEFT's match of ``target_parameters`` (peft 0.21 ``_inject_parameters``)."""
        key = f"{module}.{param}"
        return any(key == t or key.endswith(f".{t}") for t in self.target_parameters)


def _number(value, name: str, source: str) -> float:
    """A finite real number from the config (``lora_alpha``, ``alpha_pattern`` values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterError(f"{source}: {name}={value!r}; it must be a number (e.g. 16)")
    if not math.isfinite(value):
        raise AdapterError(f"{source}: {name}={value!r}; it must be finite")
    return float(value)


def _patterns(cfg: dict, name: str, source: str) -> dict:
    """``rank_pattern`` / ``alpha_pattern``: an object whose keys are valid regexes."""
    value = cfg.get(name) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"{source}: {name} must be an object of module-name regex -> value, "
                           f"found {type(value).__name__}")
    for key in value:
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as exc:
            raise AdapterError(f"{source}: {name} key {key!r} is not a valid regular expression "
                               f"({exc})") from None
    return dict(value)


def _pattern_key(patterns: dict, module: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def parse_version(text) -> tuple[int, ...] | None:
    """``"0.18.1"`` -> ``(0, 18, 1)``; suffixes like ``.dev0`` are ignored; None when absent."""
    if not text:
        return None
    nums = re.findall(r"\d+", str(text).split("+")[0])[:3]
    return tuple(int(n) for n in nums) if nums else None


@dataclass
class ModelDims:
    """The sizes of a model config an adapter is checked against (any field may be None).

    ``raw`` keeps the (text) config for :meth:`layer_shapes`; ``expert_layout`` is
    ``"interleaved"`` for gpt-oss, whose gate_up LoRA ``B`` rows alternate gate and up.
    """

    hidden: int | None = None
    moe_intermediate: int | None = None
    num_experts: int | None = None
    num_layers: int | None = None
    dense_intermediate: int | None = None
    q_out: int | None = None
    kv_out: int | None = None
    moe_layers: frozenset[int] | None = None
    expert_layout: str = "standard"
    raw: dict | None = None

    def layer_shapes(self, layer: int) -> dict[str, tuple[int | None, int | None]] | None:
        """``{module: (in, out)}`` of the 2-D linears of ``layer`` (None: no config)."""
        return None if self.raw is None else layer_linear_shapes(self.raw, layer)

    @classmethod
    def from_config(cls, cfg: dict | None) -> "ModelDims":
        """Read a HF ``config.json`` dict (every supported family's field names)."""
        if cfg is None:
            return cls()
        if not isinstance(cfg, dict):
            raise AdapterError(f"model_config must be a dict parsed from config.json, got "
                               f"{type(cfg).__name__}")
        cfg = text_config(cfg)
        hidden = cfg.get("hidden_size")
        layers = cfg.get("num_hidden_layers")
        heads, kv, head_dim = attention_dims(cfg)
        moe_index = moe_layer_indices(cfg)
        moe_layers = frozenset(moe_index) if moe_index is not None else None
        shapes = layer_linear_shapes(cfg, 0)
        q = shapes.get("self_attn.q_proj") or shapes.get("self_attn.q_b_proj")
        return cls(
            hidden=hidden,
            moe_intermediate=moe_intermediate_of(cfg),
            num_experts=num_experts_of(cfg),
            num_layers=layers,
            dense_intermediate=cfg.get("intermediate_size"),
            q_out=q[1] if q else None,
            kv_out=kv * head_dim if kv and head_dim and family_of(cfg) != "deepseek_v3"
            else None,
            moe_layers=moe_layers,
            expert_layout="interleaved" if family_of(cfg) in INTERLEAVED_EXPERTS else "standard",
            raw=cfg,
        )
