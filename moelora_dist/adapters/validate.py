"""Checks of a normalized adapter: its values, its shapes against a model config, its ranks.

Every error names the file, the layer, a checkpoint key of the offending factor (``sources``
maps ``(layer, projection, "A"|"B")`` or ``(dense path, "A"|"B")`` to one) and the expected
vs found value or shape.

Values (:func:`check_values`, once per adapter): every factor finite, and every entry of the
merged delta ``scaling * B @ A`` bounded by :data:`MAX_DELTA`. The bound is computed without
forming ``B @ A``: ``|scaling| * sum_k max_o |B[o, k]| * max_i |A[k, i]|`` per expert, which
is at least every entry's magnitude. Why 1024: a fine-tune's merged delta sits near the
scale of the base weights it adjusts (1e-3 to 1 in the models served here; ranks to 128 with
rsLoRA stay far below 1024), so only corrupt or diverged files fail; and with every entry at
most 1024 the delta of one token is at most ``in_features * 1024 * max|x|``, which stays
finite in bf16 and fp32 (max 3.4e38) for every activation below 1e31 at ``in_features <=
32768``. fp16 (max 65504) has no such margin for any bound a real adapter meets; there the
pool refuses factors it cannot store finite (``moelora_dist.lora.pool_write``), and the
kernels' selection keeps a tenant's overflow inside its own rows.
"""

from __future__ import annotations

import math
import re

import torch

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors
from moelora_dist.adapters.config import ModelDims
from moelora_dist.adapters.errors import AdapterError

MAX_DELTA = 1024.0


def _row_max(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``max |t|`` over ``dim`` in fp64 (NaN propagates, Inf stays Inf)."""
    return t.detach().abs().amax(dim=dim).double()


def check_factor_values(f: LoRAFactors, where: str, keys: tuple[str, str]) -> None:
    """Finite factors and scaling, delta within :data:`MAX_DELTA`; fills the factor's stats.

    ``keys``: the checkpoint keys of ``(lora_A, lora_B)``, named in the error.
    """
    if not math.isfinite(f.scaling):
        raise AdapterError(f"{where}: the scaling lora_alpha / r = {f.scaling} is not finite; "
                           "fix lora_alpha / alpha_pattern in adapter_config.json")
    a_rk = _row_max(f.a, -1)  # [Ea, r]: max |A[k, :]| per rank row
    b_rk = _row_max(f.b, -2)  # [Eb, r]: max |B[:, k]| per rank column
    for side, key, t, m in (("A", keys[0], f.a, a_rk), ("B", keys[1], f.b, b_rk)):
        if m.numel() and not bool(torch.isfinite(m).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise AdapterError(f"{where}: lora {side} holds NaN or Inf: key {key!r}: {n_nan} NaN "
                               f"and {n_inf} Inf values (shape {tuple(t.shape)}); the adapter is "
                               "corrupt or diverged")
    bound = abs(f.scaling) * float((a_rk * b_rk).sum(-1).max()) if a_rk.numel() else 0.0
    if not bound <= MAX_DELTA:
        raise AdapterError(
            f"{where}: key {keys[0]!r}: the merged delta scaling * B @ A may reach {bound:.3g} "
            f"(scaling {f.scaling:.3g}, max |A| {float(a_rk.max()):.3g}, max |B| "
            f"{float(b_rk.max()):.3g}); an adapter's delta must stay below {MAX_DELTA:g} "
            "(docs/adapters.md); the file is corrupt or lora_alpha is wrong")
    f.max_abs_a = float(a_rk.max()) if a_rk.numel() else 0.0
    f.max_abs_b = float(b_rk.max()) if b_rk.numel() else 0.0
    f.delta_bound = bound


def check_values(adapter: CanonicalAdapter, file: str, sources: dict | None = None) -> None:
    """:func:`check_factor_values` on every factor of ``adapter``; marks it checked."""
    sources = sources or {}
    for where, src, f in adapter.factors():
        keys = (sources.get((*src, "A"), "?"), sources.get((*src, "B"), "?"))
        check_factor_values(f, f"{file}: {where}", keys)
    adapter.values_checked = True


def _dense_expect(path: str, dims: ModelDims, key: str,
                  file: str) -> tuple[int | None, int | None]:
    """``(in, out)`` of a dense module path; ``(None, None)`` when not checkable. With a
    model config, a ``layers.{l}.`` path the layer does not have is refused (its LoRA could
    not be placed, and nothing an adapter holds is dropped)."""
    m = re.match(r"layers\.(\d+)\.(.+)$", path)
    shapes = dims.layer_shapes(int(m[1])) if m else None
    if shapes is not None:
        if m[2] not in shapes:
            raise AdapterError(
                f"{file}: key {key!r}: layer {m[1]} of this model has no linear {m[2]!r} to "
                f"put a LoRA on (its linears: {sorted(shapes)}); the adapter is for another "
                "model or layout (dense vs MoE layer)")
        return shapes[m[2]]
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
        exp_in, exp_out = _dense_expect(path, dims, keys[0], file)
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
                           f"the pool's max rank {max_rank}; raise --max-rank (max_rank= in the "
                           "API) or use a smaller adapter")
    exp_a, exp_b = f"[{E} or 1, {f.rank}, {d_in}]", f"[{E} or 1, {d_out}, {f.rank}]"
    if f.a.shape[0] not in (1, E) or f.a.shape[2] != d_in:
        raise _shape_err(file, layer, key, f"lora_A of {what} (canonical [E, r, in])", exp_a,
                         list(f.a.shape))
    if f.b.shape[0] not in (1, E) or f.b.shape[1] != d_out or f.b.shape[2] != f.rank:
        raise _shape_err(file, layer, key_b, f"lora_B of {what} (canonical [E, out, r])", exp_b,
                         list(f.b.shape))
