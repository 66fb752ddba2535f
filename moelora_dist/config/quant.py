"""The ``quantization_config`` of a checkpoint: the fine-grained FP8 layout, or a refusal.

Accepted (what transformers 5.24 reads, ``FineGrainedFP8Config`` and its quantizer)::

    "quantization_config": {
        "quant_method": "fp8",              # required
        "weight_block_size": [128, 128],    # required: one fp32 scale per 128 x 128 block
        "activation_scheme": "dynamic",     # activations quantized per token, per 128 columns
        "fmt": "e4m3",                      # optional; transformers never reads it (the tensor
                                            # dtype decides), but "e5m2" here is refused
        "modules_to_not_convert": [...],    # optional; when given it must name lm_head itself
        "scale_fmt": "float" | "ue8m0",     # optional (default float); ue8m0 = powers of two
        "dequantize": false                 # optional; true: dequantize to --dtype at load
    }

A weight ``<module>.weight`` stored as ``float8_e4m3fn`` ``[out, in]`` comes with
``<module>.weight_scale_inv`` fp32 ``[ceil(out/128), ceil(in/128)]`` (row blocks first) and
means ``w[r, c] = fp8[r, c] * weight_scale_inv[r // 128, c // 128]``. Refused with one line:
another quant method, a block size other than 128 x 128 (or none: per-tensor scales), static
activation scales, e5m2, FP8 embeddings (``modules_to_convert``), FP4 experts
(``expert_dtype``), unknown ``scale_fmt``. Per-tensor or per-channel scale tensors and missing
scales are refused per tensor by the loader (:mod:`moelora_dist.models.fp8_weights`).

This module depends on neither torch nor transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moelora_dist.errors import MoeloraError

FP8_BLOCK = 128  # rows and columns per weight scale; also the activation group size


class QuantConfigError(MoeloraError):
    """A ``quantization_config`` this runtime does not serve; the message names the field."""


@dataclass(frozen=True)
class FP8Config:
    """The accepted fine-grained FP8 layout (see the module docstring)."""

    block_size: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)
    scale_fmt: str = "float"  # "float" | "ue8m0"
    modules_to_not_convert: tuple[str, ...] | None = None
    dequantize: bool = False

    def converts(self, module: str) -> bool:
        """Whether transformers makes ``module`` (``model.layers.0.self_attn.q_proj``) an FP8
        module: its ``should_convert_module`` rule. With no ``modules_to_not_convert`` the
        default skip is the output embedding ``lm_head``; a given list replaces that default,
        so it must name ``lm_head`` itself."""
        patterns = (("lm_head",) if self.modules_to_not_convert is None
                    else self.modules_to_not_convert)
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return not any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p)
                       for p in patterns)

    def describe(self) -> str:
        return (f"FP8 e4m3 weights, {self.block_size[0]}x{self.block_size[1]} block scales "
                f"({self.scale_fmt}), activations quantized dynamically per token and "
                f"{FP8_BLOCK} columns")


def parse_quantization_config(raw: dict) -> FP8Config | None:
    """``FP8Config`` for a fine-grained FP8 ``quantization_config``, None when there is none;
    :class:`QuantConfigError` naming the field for anything else."""
    q = raw.get("quantization_config")
    if q is None or q == {}:
        return None
    if not isinstance(q, dict):
        raise QuantConfigError(f"quantization_config must be an object, found {q!r}")
    method = q.get("quant_method")
    if method != "fp8":
        raise QuantConfigError(
            f"quantization_config quant_method {method!r} is not supported; only the "
            "fine-grained FP8 layout (quant_method \"fp8\", 128x128 block scales) is; use that "
            "or a bf16/fp16/fp32 checkpoint")
    fmt = q.get("fmt", "e4m3")
    if fmt not in ("e4m3", "float8_e4m3fn"):
        raise QuantConfigError(
            f"quantization_config fmt {fmt!r} is not supported; FP8 weights must be e4m3 "
            "(float8_e4m3fn); e5m2 checkpoints are refused")
    block = q.get("weight_block_size")
    if block is None:
        raise QuantConfigError(
            "quantization_config has no weight_block_size: per-tensor FP8 scales are not "
            "supported; only 128x128 block scales (weight_block_size [128, 128]) are")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or [int(b) if isinstance(b, int) and not isinstance(b, bool) else None
                for b in block] != [FP8_BLOCK, FP8_BLOCK]):
        raise QuantConfigError(
            f"quantization_config weight_block_size {block!r} is not supported; only "
            f"[{FP8_BLOCK}, {FP8_BLOCK}] block scales are (the kernels quantize activations in "
            f"groups of {FP8_BLOCK} columns, matching the weight blocks)")
    scheme = str(q.get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        raise QuantConfigError(
            f"quantization_config activation_scheme {q.get('activation_scheme')!r} is not "
            "supported; only \"dynamic\" (per-token, per-128-column activation scales computed "
            "at run time) is: static activation scales are not read")
    scale_fmt = q.get("scale_fmt", "float") or "float"
    if scale_fmt not in ("float", "ue8m0"):
        raise QuantConfigError(f"quantization_config scale_fmt {scale_fmt!r} is not supported; "
                               "expected \"float\" or \"ue8m0\"")
    if q.get("modules_to_convert"):
        raise QuantConfigError(
            "quantization_config modules_to_convert (FP8 embedding tables) is not supported; "
            "only linear and expert weights may be FP8")
    if q.get("expert_dtype", "fp8") != "fp8":
        raise QuantConfigError(f"quantization_config expert_dtype {q.get('expert_dtype')!r} "
                               "(FP4 experts) is not supported; experts must be FP8 e4m3")
    skip = q.get("modules_to_not_convert", q.get("ignored_layers"))
    if skip is not None and (not isinstance(skip, list)
                             or not all(isinstance(s, str) for s in skip)):
        raise QuantConfigError(f"quantization_config modules_to_not_convert {skip!r} must be a "
                               "list of module names")
    dequantize = q.get("dequantize", False)
    if not isinstance(dequantize, bool):
        raise QuantConfigError(f"quantization_config dequantize {dequantize!r} must be true "
                               "or false")
    return FP8Config(scale_fmt=scale_fmt,
                     modules_to_not_convert=None if skip is None else tuple(skip),
                     dequantize=dequantize)
