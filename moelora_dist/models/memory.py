"""Where a rank's weights live and how much memory they take (the start-up log's lines).

A weight is a tensor in the model dtype or, from an FP8 checkpoint, a
:class:`~moelora_dist.kernels.weights_fp8.BlockFP8Weight` (e4m3 values + fp32 block scales) that
keeps its dtype when it is moved to the device.
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.weights_fp8 import BlockFP8Weight
from moelora_dist.lora.pool_report import human_bytes


def place_weight(t, device, dtype: torch.dtype):
    """``t`` on ``device``: a tensor cast to ``dtype``, an FP8 weight moved as it is."""
    if isinstance(t, BlockFP8Weight):
        return t.to_device(device)
    return t.to(device=device, dtype=dtype)


def _weights(model):
    yield model.embed_VH
    if model.lm_head_VH is not model.embed_VH:
        yield model.lm_head_VH
    yield model.final_norm_H
    for layer in model.layers:
        yield layer["ln1"]
        yield layer["ln2"]
        yield from _owned(layer["attn"].w)
        if "moe" in layer:
            base = layer["moe"].base
            yield from (base.router, base.w_gate_up, base.w_down)
            yield from (t for t in (base.router_bias, base.correction_bias, base.b_gate_up,
                                    base.b_down) if t is not None)
            if "shared" in layer:
                yield from _owned(layer["shared"].w)
        else:
            yield from _owned(layer["mlp"].w)


# A fused weight and the parts that are views of its rows (``lora_linear.fuse_rows``).
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                "gate_up_proj": ("gate_proj", "up_proj"),
                "qkv_a_proj": ("q_a_proj", "q_proj", "kv_a_proj_with_mqa")}  # MLA


def _owned(w: dict):
    """The weights of ``w`` that own their memory (not the views of a fused weight's rows)."""
    views = {p for fused, parts in _FUSED_PARTS.items() if fused in w for p in parts}
    return (t for k, t in w.items() if k not in views)


def weight_bytes(model) -> tuple[int, int]:
    """``(bytes of FP8 weights incl. their scales, bytes of the other weights)`` on this rank."""
    fp8 = other = 0
    for w in _weights(model):
        if isinstance(w, BlockFP8Weight):
            fp8 += w.nbytes()
        else:
            other += w.numel() * w.element_size()
    return fp8, other


def describe_memory(model) -> str:
    """One line: the base's precision and the bytes of weights, LoRA pool and KV cache."""
    fp8, other = weight_bytes(model)
    cfg = model.cfg
    if fp8:
        base = f"base FP8 ({cfg.fp8.describe()})"
    elif cfg.fp8 is not None:
        base = "base FP8 checkpoint dequantized at load to " + str(model.dtype).replace("torch.", "")
    else:
        base = "base " + str(model.dtype).replace("torch.", "")
    return (f"{base}: weights {human_bytes(fp8 + other)} per rank (FP8 values + scales "
            f"{human_bytes(fp8)}, other {human_bytes(other)}); LoRA pool "
            f"{human_bytes(model.pool.nbytes())}; KV cache in pages sized by the engine "
            f"({human_bytes(kv_bytes_per_token(model))} per token)")


def kv_bytes_per_token(model) -> int:
    """Bytes of K and V one token occupies on this rank over all layers."""
    elem = torch.empty((), dtype=model.dtype).element_size()
    cfg = model.cfg  # MLA caches values of v_head_dim next to keys of qk_head_dim
    return cfg.num_layers * model.split.num_kv * (cfg.head_dim + cfg.v_head_dim) * elem
