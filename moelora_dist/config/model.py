"""What the runner needs to know about a Hugging Face MoE checkpoint, read from its config.json.

Six ``model_type`` values (five families) are supported; they differ in ways that change the
numbers (all read from transformers 5's modeling code):

| fact | Qwen3-MoE (``qwen3_moe``) | Mixtral (``mixtral``) | OLMoE (``olmoe``) |
| --- | --- | --- | --- |
| expert count key | ``num_experts`` (saved as ``num_local_experts``) | ``num_local_experts`` | ``num_experts`` |
| expert intermediate | ``moe_intermediate_size`` | ``intermediate_size`` | ``intermediate_size`` |
| top-k renormalized | ``norm_topk_prob`` | always | ``norm_topk_prob`` |
| q/k norm | RMSNorm per head (``head_dim``) | none | RMSNorm over the whole projection |
| dense MLP layers | ``mlp_only_layers``, ``decoder_sparse_step`` | none | none |
| expert keys | ``mlp.experts.{e}.gate_proj`` | ``block_sparse_moe.experts.{e}.w1`` | ``mlp.experts.{e}.gate_proj`` |
| sliding window | only when ``use_sliding_window`` | ``sliding_window`` | none |

DeepSeek-V3 (and Kimi-K2, ``kimi_k2``), GLM-4.5 (``glm4_moe``) and gpt-oss (``gpt_oss``) are
described in :mod:`.families` (table) and read by :mod:`.family_fields`; their RoPE by
:mod:`.rope`.

This module depends on neither transformers nor torch: it parses a dict. It is the one
parser of a model's ``config.json``: the lenient field readers of :mod:`.families` (expert
count, intermediate sizes, which layers are MoE, the linears of a layer) serve both
:class:`ModelConfig` (the runner) and the adapter loader's view of a partial config
(:class:`moelora_dist.adapters.config.ModelDims`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from moelora_dist.config.families import (  # noqa: F401  (re-exported lenient readers)
    MLADims, attention_dims, family_of, moe_intermediate_of, moe_layer_indices, num_experts_of)
from moelora_dist.config.family_fields import (FamilyConfigError, classic_fields,
                                               gpt_oss_fields, grouped_router_fields)
from moelora_dist.config.rope import RopeConfig
from moelora_dist.config.quant import FP8Config, QuantConfigError, parse_quantization_config
from moelora_dist.errors import MoeloraError
from moelora_dist.files.paths import kind_of, read_json_object

SUPPORTED_ARCHS = ("qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "kimi_k2", "glm4_moe",
                   "gpt_oss")
# quantization_config methods served (dequantized at load); every other one is refused.
DEQUANTIZED_AT_LOAD = {"gpt_oss": ("mxfp4",)}


class ModelConfigError(MoeloraError):
    """A config.json the runner cannot serve; the message says what to change."""


def text_config(raw: dict) -> dict:
    """The language model's part of a config (multimodal configs nest it as ``text_config``)."""
    if "text_config" in raw and "hidden_size" not in raw and isinstance(raw["text_config"], dict):
        return raw["text_config"]
    return raw


@dataclass(frozen=True)
class ModelConfig:
    """Architecture facts of one checkpoint (see the module tables for where each comes from).

    ``arch`` is the family (``deepseek_v3`` for Kimi-K2 too; ``model_type`` keeps the name
    the config gave). ``head_dim`` is the query/key head dim (MLA: ``qk_nope + qk_rope``).
    """

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
    qk_norm: str = "none"  # "none" | "head" (Qwen3, GLM) | "full" (OLMoE)
    clip_qkv: float | None = None
    attention_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    activation: str = "silu"  # "silu" | "swiglu_oai" (gpt-oss's clamped SwiGLU)
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str | None = None
    max_positions: int | None = None
    fp8: FP8Config | None = None  # set for a fine-grained FP8 checkpoint (config/quant.py)
    model_type: str = ""
    rope: RopeConfig | None = None
    # MoE block
    shared_intermediate: int = 0  # shared experts (n_shared * moe_intermediate), 0: none
    router: str = "softmax"  # "softmax" | "sigmoid_grouped" | "topk_softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_fp32: bool = False  # router logits in fp32 (DeepSeek-V3 / GLM keep it fp32)
    router_bias: bool = False  # gpt-oss
    correction_bias: bool = False  # e_score_correction_bias (selection only)
    expert_bias: bool = False  # gpt-oss gate_up / down biases
    expert_layout: str = "standard"  # "interleaved": gpt-oss [E, H, 2I], gate/up interleaved
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # attention
    attention: str = "gqa"  # "gqa" | "mla"
    mla: MLADims | None = None
    sinks: bool = False
    layer_windows: tuple[int | None, ...] = ()  # per layer (gpt-oss); () = sliding_window
    o_bias: bool | None = None  # None: read o_proj.bias when the checkpoint has one
    norm_weight_first: bool = False  # gpt-oss RMSNorm: weight * x in fp32, then cast
    mtp_layers: int = 0  # DeepSeek-V3 / GLM-4.5 multi-token-prediction layers (not served)
    quant_method: str | None = None  # "mxfp4": gpt-oss experts, dequantized at load
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def moe_prefix(self) -> str:
        """Module name of the MoE block inside a decoder layer in checkpoint keys."""
        return "block_sparse_moe" if self.arch == "mixtral" else "mlp"

    @property
    def router_name(self) -> str:
        """The router's module inside the MoE block (gpt-oss ``router``, else ``gate``)."""
        return "router" if self.arch == "gpt_oss" else "gate"

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layers)

    def window_of(self, layer: int) -> int | None:
        """The sliding window of ``layer``'s attention (None: full causal)."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @property
    def v_head_dim(self) -> int:
        return self.mla.v_head_dim if self.mla is not None else self.head_dim

    @property
    def q_out(self) -> int:
        """Output features of the full query projection (all heads)."""
        return self.num_heads * self.head_dim

    @property
    def attn_out(self) -> int:
        """Input features of ``o_proj``: heads x value dim (MLA: ``v_head_dim``)."""
        return self.num_heads * self.v_head_dim

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
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_ARCHS:
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHS)}")
        arch = family_of(raw)
        quant_method, fp8 = _quantization(arch, raw)
        hidden = _req(raw, "hidden_size")
        _req(raw, "num_attention_heads")
        heads, kv_heads, head_dim = attention_dims(raw)
        if arch == "olmoe" and head_dim * heads != hidden:
            raise ModelConfigError("OLMoE needs head_dim * num_attention_heads == hidden_size")
        num_experts = num_experts_of(raw)
        if not num_experts:
            raise ModelConfigError(f"{arch} config has neither num_experts nor num_local_experts"
                                   + (" nor n_routed_experts" if arch in ("deepseek_v3",
                                                                           "glm4_moe") else ""))
        num_layers = _req(raw, "num_hidden_layers")
        top_k = _req(raw, "num_experts_per_tok")
        try:
            if arch in ("deepseek_v3", "glm4_moe"):
                fields = grouped_router_fields(arch, raw, num_layers, num_experts, top_k,
                                               head_dim)
            elif arch == "gpt_oss":
                fields = gpt_oss_fields(raw, num_layers, head_dim)
            else:
                fields = classic_fields(arch, raw, num_layers, head_dim)
        except FamilyConfigError as exc:
            raise ModelConfigError(str(exc)) from None
        dense_layers = num_layers - len(fields["moe_layers"])
        if dense_layers and fields["dense_intermediate"] <= 0:
            raise ModelConfigError("config has dense MLP layers but no intermediate_size")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"hidden_act {act!r} is not supported (only silu)")
        eos = (generation_config or {}).get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(e for e in ([eos] if isinstance(eos, int) else (eos or []))
                        if 0 <= e < raw["vocab_size"])
        fields.setdefault("head_dim", head_dim)
        return cls(
            arch=arch, vocab_size=_req(raw, "vocab_size"), hidden_size=hidden,
            num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=fields["rope"].theta, num_experts=int(num_experts), top_k=top_k,
            clip_qkv=raw.get("clip_qkv"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids, checkpoint_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            max_positions=raw.get("max_position_embeddings"), model_type=model_type,
            quant_method=quant_method, fp8=fp8, raw=raw, **fields)


_INT_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "num_hidden_layers", "vocab_size", "num_experts_per_tok", "num_experts",
               "num_local_experts", "n_routed_experts", "moe_intermediate_size",
               "intermediate_size", "decoder_sparse_step", "kv_lora_rank", "q_lora_rank",
               "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group",
               "n_shared_experts", "sliding_window")


def _check_types(raw: dict) -> None:
    """Size fields must be positive integers: a string or a float there is a broken config,
    said in one line instead of a TypeError deep in the model builder."""
    for key in _INT_FIELDS:
        v = raw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ModelConfigError(f"config field {key!r} is {v!r}; it must be a positive integer")


def _quantization(arch: str, raw: dict) -> tuple[str | None, FP8Config | None]:
    """``(quant_method, fp8)``: gpt-oss's MXFP4 experts (dequantized at load), or the
    fine-grained FP8 layout (:mod:`.quant`); any other ``quantization_config`` is refused:
    its weights would be read without their scales."""
    quant = raw.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    if quant and method in DEQUANTIZED_AT_LOAD.get(arch, ()):
        return method, None
    try:  # the fine-grained FP8 layout is served; every other quantization is refused
        return None, parse_quantization_config(raw)
    except QuantConfigError as exc:
        hint = " (gpt-oss MXFP4 experts are dequantized at load)" if arch == "gpt_oss" else ""
        raise ModelConfigError(f"{exc}{hint}") from None


def _req(raw: dict, key: str):
    if raw.get(key) is None:
        raise ModelConfigError(f"config.json lacks {key!r}")
    return raw[key]
