"""Checks of a normalized adapter against itself, a model config and the pool's max rank.

Every error names the file, the layer, a checkpoint key of the offending factor (``sources``
maps ``(layer, projection, "A"|"B")`` or ``(dense path, "A"|"B")`` to one) and the expected
vs found shape.
"""

from __future__ import annotations

import re

import torch

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors
from moelora_dist.adapters.config import ModelDims
from moelora_dist.adapters.errors import AdapterError


def check_finite(file: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN / Inf anywhere (a diverged run would poison every token routed through it)."""
    for key, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        # aminmax propagates NaN and exposes +-Inf, and is ~50x faster than an isfinite mask
        # on CPU bf16; the exact counts are only computed for the error message.
        lo, hi = torch.aminmax(t)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise AdapterError(f"{file}: key {key!r}: {n_nan} NaN and {n_inf} Inf values "
                               f"(shape {tuple(t.shape)}); the adapter is corrupt or diverged")


def _dense_expect(path: str, dims: ModelDims) -> tuple[int | None, int | None]:
    """``(in, out)`` of known dense module names; ``(None, None)`` when not checkable."""
    H = dims.hidden
    name = path.rsplit(".", 1)[-1]
    if re.search(r"self_attn\.[qkvo]_proj$", path):
        return {"q_proj": (H, dims.q_out), "k_proj": (H, dims.kv_out),
                "v_proj": (H, dims.kv_out), "o_proj": (dims.q_out, H)}[name]
    if re.search(r"layers\.\d+\.mlp\.(gate|up|down)_proj$", path):
        Id = dims.dense_intermediate
        return (Id, H) if name == "down_proj" else (H, Id)
    return None, None


def _shape_err(file, layer, key, what, expected, found) -> AdapterError:
    where = f"layer {layer}, " if layer is not None and layer >= 0 else ""
    return AdapterError(f"{file}: {where}key {key!r}: shape mismatch for {what}: expected "
                        f"{expected}, found {found}")


def validate(adapter: CanonicalAdapter, dims: ModelDims, max_rank: int | None,
             sources: dict, file: str) -> None:
    """Raise :class:`AdapterError` on the first inconsistency (see module docstring)."""
    experts = {l: m.num_experts for l, m in adapter.moe.items()}
    if len(set(experts.values())) > 1:
        raise AdapterError(f"{file}: expert count mismatch between layers: {experts}")
    for layer, moe in sorted(adapter.moe.items()):
        E = moe.num_experts
        if dims.num_experts is not None and E != dims.num_experts:
            key = sources.get((layer, next(iter(moe.projections())), "A"), "?")
            raise AdapterError(f"{file}: layer {layer}, key {key!r}: expert count mismatch: the "
                               f"adapter has {E} experts, the model {dims.num_experts}")
        if dims.num_layers is not None and layer >= dims.num_layers:
            raise AdapterError(f"{file}: layer {layer}: the model has only {dims.num_layers} "
                               "layers")
        if dims.moe_layers is not None and layer not in dims.moe_layers:
            raise AdapterError(f"{file}: layer {layer}: expert LoRA on a layer that is dense in "
                               "the model config (mlp_only_layers / decoder_sparse_step)")
        proj = moe.projections()
        # Without a model config, the first projection fixes H and I for the others.
        first_name, first = next(iter(proj.items()))
        own_h, own_i = ((first.out_dim, first.in_dim) if first_name == "down"
                        else (first.in_dim, first.out_dim))
        H, I = dims.hidden or own_h, dims.moe_intermediate or own_i
        for name, f in proj.items():
            keys = (sources.get((layer, name, "A"), "?"), sources.get((layer, name, "B"), "?"))
            exp_in, exp_out = (I, H) if name == "down" else (H, I)
            _check_factors(file, layer, keys, f"the {name} projection", f, exp_in, exp_out,
                           max_rank, E)
    for path, f in sorted(adapter.dense.items()):
        keys = (sources.get((path, "A"), "?"), sources.get((path, "B"), "?"))
        exp_in, exp_out = _dense_expect(path, dims)
        layer = int(m[1]) if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", path)) else None
        if layer is not None and dims.num_layers is not None and layer >= dims.num_layers:
            raise AdapterError(f"{file}: key {keys[0]!r}: layer {layer} but the model has only "
                               f"{dims.num_layers} layers")
        _check_factors(file, layer, keys, f"module {path}", f, exp_in or f.in_dim,
                       exp_out or f.out_dim, max_rank, 1)


def _check_factors(file, layer, keys, what, f: LoRAFactors, d_in, d_out, max_rank, E) -> None:
    """``keys``: the checkpoint keys of (lora_A, lora_B), named in the error."""
    key, key_b = keys
    if f.rank == 0:
        raise AdapterError(f"{file}: layer {layer}, key {key!r}: rank 0 for {what}")
    if max_rank is not None and f.rank > max_rank:
        raise AdapterError(f"{file}: layer {layer}, key {key!r}: rank {f.rank} of {what} exceeds "
                           f"the pool's max rank {max_rank}; raise max_lora_rank or use a smaller "
                           "adapter")
    exp_a, exp_b = f"[{E} or 1, {f.rank}, {d_in}]", f"[{E} or 1, {d_out}, {f.rank}]"
    if f.a.shape[0] not in (1, E) or f.a.shape[2] != d_in:
        raise _shape_err(file, layer, key, f"lora_A of {what} (canonical [E, r, in])", exp_a,
                         list(f.a.shape))
    if f.b.shape[0] not in (1, E) or f.b.shape[1] != d_out or f.b.shape[2] != f.rank:
        raise _shape_err(file, layer, key_b, f"lora_B of {what} (canonical [E, out, r])", exp_b,
                         list(f.b.shape))
