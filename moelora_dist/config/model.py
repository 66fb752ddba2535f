"""What the runner needs to know about a Hugging Face MoE checkpoint, read from its config.json.

Three architectures are supported, and they differ in small ways that change the numbers
(all read from transformers 5's modeling code):

| fact | Qwen3-MoE (``qwen3_moe``) | Mixtral (``mixtral``) | OLMoE (``olmoe``) |
| --- | --- | --- | --- |
| expert count key | ``num_experts`` (saved as ``num_local_experts``) | ``num_local_experts`` | ``num_experts`` |
| expert intermediate | ``moe_intermediate_size`` | ``intermediate_size`` | ``intermediate_size`` |
| top-k renormalized | ``norm_topk_prob`` | always | ``norm_topk_prob`` |
| q/k norm | RMSNorm per head (``head_dim``) | none | RMSNorm over the whole projection |
| dense MLP layers | ``mlp_only_layers``, ``decoder_sparse_step`` | none | none |
| expert keys | ``mlp.experts.{e}.gate_proj`` | ``block_sparse_moe.experts.{e}.w1`` | ``mlp.experts.{e}.gate_proj`` |
| sliding window | only when ``use_sliding_window`` | ``sliding_window`` | none |

This module depends on neither transformers nor torch: it parses a dict. It is the one
parser of a model's ``config.json``: the field readers below (expert count, expert
intermediate size, which layers are MoE, attention sizes) serve both :class:`ModelConfig`
(the runner) and the adapter loader's lenient view of a partial config
(:class:`moelora_dist.adapters.config.ModelDims`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from moelora_dist.errors import MoeloraError
from moelora_dist.config.quant import FP8Config, QuantConfigError, parse_quantization_config
from moelora_dist.files.paths import kind_of, read_json_object

SUPPORTED_ARCHS = ("qwen3_moe", "mixtral", "olmoe")


class ModelConfigError(MoeloraError):
    """A config.json the runner cannot serve; the message says what to change."""


def text_config(raw: dict) -> dict:
    """The language model's part of a config (multimodal configs nest it as ``text_config``)."""
    if "text_config" in raw and "hidden_size" not in raw and isinstance(raw["text_config"], dict):
        return raw["text_config"]
    return raw


def num_experts_of(raw: dict) -> int | None:
    """Routed experts per MoE layer (``num_experts``, ``num_local_experts`` or
    ``n_routed_experts``), or None for a dense config."""
    value = raw.get("num_experts") or raw.get("num_local_experts") or raw.get("n_routed_experts")
    return int(value) if value else None


def moe_intermediate_of(raw: dict) -> int | None:
    """Intermediate size of one expert: ``moe_intermediate_size`` where the family has it,
    else ``intermediate_size`` (Mixtral, OLMoE)."""
    value = raw.get("moe_intermediate_size") or raw.get("intermediate_size")
    return int(value) if value else None


def moe_layer_indices(raw: dict) -> tuple[int, ...] | None:
    """Layers whose MLP is a MoE block (Qwen3-MoE: not in ``mlp_only_layers`` and on the
    ``decoder_sparse_step``); None when the config does not say how many layers."""
    layers = raw.get("num_hidden_layers")
    if layers is None or not num_experts_of(raw):
        return None
    only = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step") or 1)
    return tuple(i for i in range(int(layers)) if i not in only and (i + 1) % step == 0)


def attention_dims(raw: dict) -> tuple[int | None, int | None, int | None]:
    """``(num_heads, num_kv_heads, head_dim)``; None where the config lacks them."""
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    kv = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or (hidden // heads if hidden and heads else None)
    return heads, kv, head_dim


@dataclass(frozen=True)
class ModelConfig:
    """Architecture facts of one checkpoint (see the module table for where each comes from)."""

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    num_experts: int
    top_k: int
    moe_intermediate: int
    renormalize: bool
    dense_intermediate: int = 0
    moe_layers: tuple[int, ...] = ()
    qk_norm: str = "none"  # "none" | "head" (Qwen3) | "full" (OLMoE)
    clip_qkv: float | None = None
    attention_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    activation: str = "silu"
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str | None = None
    max_positions: int | None = None
    fp8: FP8Config | None = None  # set for a fine-grained FP8 checkpoint (config/quant.py)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def moe_prefix(self) -> str:
        """Module name of the MoE block inside a decoder layer in checkpoint keys."""
        return "block_sparse_moe" if self.arch == "mixtral" else "mlp"

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layers)

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        """Read ``model_dir/config.json`` (and ``generation_config.json`` for EOS ids)."""
        kind = kind_of(model_dir)
        if kind != "dir":
            what = {"missing": "does not exist", "file": "is a file"}.get(kind, "is unreadable")
            raise ModelConfigError(
                f"--model {model_dir} {what}, so there is no config.json; --model must be a "
                "Hugging Face model directory (config.json + *.safetensors)")
        path = os.path.join(model_dir, "config.json")
        if kind_of(path) == "missing":
            raise ModelConfigError(
                f"{model_dir} has no config.json; --model must be a Hugging Face model directory "
                "(config.json + *.safetensors)")
        raw = read_json_object(path, "model config")
        gen_path = os.path.join(model_dir, "generation_config.json")
        gen = read_json_object(gen_path, "generation config") if kind_of(gen_path) != "missing" \
            else {}
        try:
            return cls.from_dict(raw, generation_config=gen)
        except ModelConfigError as exc:
            raise ModelConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, raw: dict, generation_config: dict | None = None) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ModelConfigError(f"config must be a JSON object, found {type(raw).__name__}")
        raw = text_config(raw)
        _check_types(raw)
        arch = raw.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            raise ModelConfigError(
                f"model_type {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
        try:  # the fine-grained FP8 layout is served; every other quantization is refused
            fp8 = parse_quantization_config(raw)
        except QuantConfigError as exc:
            raise ModelConfigError(str(exc)) from None
        hidden = _req(raw, "hidden_size")
        _req(raw, "num_attention_heads")
        heads, kv_heads, head_dim = attention_dims(raw)
        if arch == "olmoe" and head_dim * heads != hidden:
            raise ModelConfigError("OLMoE needs head_dim * num_attention_heads == hidden_size")
        num_experts = num_experts_of(raw)
        if not num_experts:
            raise ModelConfigError(f"{arch} config has neither num_experts nor num_local_experts")
        num_layers = _req(raw, "num_hidden_layers")
        if arch == "qwen3_moe":
            moe_inter = _req(raw, "moe_intermediate_size")
            dense_inter = int(raw.get("intermediate_size") or 0)
            moe_layers = moe_layer_indices(raw)
            renorm = bool(raw.get("norm_topk_prob", False))
            qk_norm = "head"
            window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
        else:
            moe_inter = _req(raw, "intermediate_size")
            dense_inter = 0
            moe_layers = tuple(range(num_layers))
            renorm = True if arch == "mixtral" else bool(raw.get("norm_topk_prob", False))
            qk_norm = "full" if arch == "olmoe" else "none"
            window = raw.get("sliding_window") if arch == "mixtral" else None
        if len(moe_layers) < num_layers and dense_inter <= 0:
            raise ModelConfigError("config has dense MLP layers but no intermediate_size")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"hidden_act {act!r} is not supported (only silu)")
        eos = (generation_config or {}).get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(e for e in ([eos] if isinstance(eos, int) else (eos or []))
                        if 0 <= e < raw["vocab_size"])
        return cls(
            arch=arch, vocab_size=_req(raw, "vocab_size"), hidden_size=hidden,
            num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(raw),
            num_experts=int(num_experts), top_k=_req(raw, "num_experts_per_tok"),
            moe_intermediate=int(moe_inter), renormalize=renorm, dense_intermediate=dense_inter,
            moe_layers=moe_layers, qk_norm=qk_norm, clip_qkv=raw.get("clip_qkv"),
            attention_bias=bool(raw.get("attention_bias", False)), sliding_window=window,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), activation=act,
            eos_token_ids=eos_ids, checkpoint_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            max_positions=raw.get("max_position_embeddings"), fp8=fp8,
            raw=raw,
        )


_INT_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "num_hidden_layers", "vocab_size", "num_experts_per_tok", "num_experts",
               "num_local_experts", "n_routed_experts", "moe_intermediate_size",
               "intermediate_size", "decoder_sparse_step")


def _check_types(raw: dict) -> None:
    """Size fields must be positive integers: a string or a float there is a broken config,
    said in one line instead of a TypeError deep in the model builder."""
    for key in _INT_FIELDS:
        v = raw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ModelConfigError(f"config field {key!r} is {v!r}; it must be a positive integer")


def _req(raw: dict, key: str):
    if raw.get(key) is None:
        raise ModelConfigError(f"config.json lacks {key!r}")
    return raw[key]


def _rope_theta(raw: dict) -> float:
    """``rope_parameters`` (transformers 5) or ``rope_theta`` / ``rope_scaling`` (older files)."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") \
        or "default"
    if rope_type != "default":
        raise ModelConfigError(
            f"rope_type {rope_type!r} is not supported; only the default RoPE is implemented")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:  # transformers falls back to the class's default_theta
        theta = 1e6 if raw.get("model_type") == "mixtral" else 1e4
    return float(theta)
