"""PEFT ``target_parameters`` LoRA on transformers-5 3-D experts -> canonical factors.

Legend: E experts, H hidden, I expert intermediate, r rank.

The experts module holds ``gate_up_proj: [E, 2I, H]`` (gate rows, then up rows) and
``down_proj: [E, H, I]``. PEFT wraps each targeted parameter in a ``ParamWrapper``, nesting
them in the order the parameters are defined (``gate_up_proj`` first, so innermost); the keys
of the innermost wrapper carry the most ``base_layer.`` hops. With both targeted, gate_up sits
under ``experts.base_layer.lora_*`` and down under ``experts.lora_*``; with one targeted it is
under ``experts.lora_*`` whichever it is, so the parameter is taken from ``target_parameters``
in the config, never from the key.

Per parameter (``out, in`` of ``[E, out, in]``), peft >= 0.19 stores ``lora_A: [r*E, in]``
(expert-major) and ``lora_B: [out, r*E]`` (rank-major):
``delta[e] = B.view(out, r, E)[:, :, e] @ A.view(E, r, in)[e]``. peft <= 0.18 took the
parameter as ``[E, in, out]``: ``lora_A: [r*E, out]``, ``lora_B: [in, r*E]`` and
``delta[e] = (B_e @ A_e)^T`` — so canonical ``a_e = B_e^T`` and ``b_e = A_e^T``. The orientation
is read from the shapes (model config, or the two parameters against each other); only when
those cannot tell, ``peft_version`` decides (no version: current orientation, with a warning).

gpt-oss stores its experts ``[E, in, out]`` (``x @ W``; PEFT marks them transposed) with the
gate/up outputs interleaved: ``lora_A: [r*E, H]``, ``lora_B: [2I, r*E]`` as above, and the
delta is transposed onto the weight, so ``lora_B``'s rows follow the interleaved order. They
are de-interleaved here, exactly as the checkpoint's weights are at load. Every PEFT version
writes that one orientation for them (the storage is already ``[E, in, out]``).
"""

from __future__ import annotations

import warnings

import torch

from moelora_dist.adapters.canonical import LoRAFactors
from moelora_dist.adapters.formats import Ctx, checked_scale, split_gate_up
from moelora_dist.adapters.keys import ParsedKey
from moelora_dist.parallel.sharding import deinterleave_gate_up

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # definition order in transformers-5 experts
_LEGACY_BEFORE = (0, 19)


def _out_in(param: str, H: int | None, I: int | None) -> tuple[int | None, int | None]:
    if param == "gate_up_proj":
        return (2 * I if I else None), H
    return H, I


def convert_params(ctx: Ctx, layer: int, experts_module: str,
                   by_depth: dict[int, dict[str, tuple[ParsedKey, torch.Tensor]]],
                   num_experts: int | None) -> tuple[dict[str, LoRAFactors], bool, dict]:
    """The wrapper levels of one experts module -> ``(factors, legacy, keys)``.

    ``by_depth[d]["A"|"B"]``: ``(key, tensor)`` of the wrapper with ``d`` ``base_layer`` hops;
    tensors ``lora_A: [r*E, in]`` / ``lora_B: [out, r*E]`` (or the legacy transposes).
    Returns ``{gate|up|down: LoRAFactors}``, ``legacy`` (True when the peft <= 0.18
    orientation was detected) and ``{gate|up|down: {"A"|"B": checkpoint key}}``.

    Which wrapper holds which parameter follows PEFT 0.21's nesting (definition order, first
    innermost); if the shapes contradict it and fit the other nesting (a writer that wrapped
    in another order), the other nesting is used.
    """
    any_key = next(iter(next(iter(by_depth.values())).values()))[0].key
    params = [p for p in EXPERT_PARAMS if ctx.cfg.targets_parameter(experts_module, p)]
    if not params:
        raise ctx.fail(layer, any_key, f"a target_parameters LoRA on {experts_module!r}, but "
                       f"adapter_config.json target_parameters={ctx.cfg.target_parameters} names "
                       f"neither of {EXPERT_PARAMS}; fix the config")
    depth_of = {p: len(params) - 1 - i for i, p in enumerate(params)}
    if set(by_depth) != set(depth_of.values()):
        raise ctx.fail(layer, any_key, f"target_parameters {params} imply wrapper depths "
                       f"{sorted(depth_of.values())} (base_layer hops) but the file has "
                       f"{sorted(by_depth)}; config and weights disagree")
    for d, fac in by_depth.items():
        for f in "AB":
            if f not in fac:
                other = next(iter(fac.values()))[0].key
                raise ctx.fail(layer, other, f"lora_{f} of this wrapper is missing")
            if fac[f][1].ndim != 2:
                raise ctx.fail(layer, fac[f][0].key, f"expected a 2-D tensor, found "
                               f"{tuple(fac[f][1].shape)}")
    fac = {p: by_depth[depth_of[p]] for p in params}
    if len(params) == 2 and not any(_fits(ctx, fac)):
        swapped = {params[0]: fac[params[1]], params[1]: fac[params[0]]}
        if any(_fits(ctx, swapped)):
            fac = swapped
    interleaved = ctx.dims.expert_layout == "interleaved"
    legacy = False if interleaved else _orientation(ctx, layer, fac, any_key)
    out: dict[str, LoRAFactors] = {}
    keys: dict[str, dict[str, str]] = {}
    for p in params:
        (pa, A), (pb, B) = fac[p]["A"], fac[p]["B"]
        for q in (("gate", "up") if p == "gate_up_proj" else ("down",)):
            keys[q] = {"A": pa.key, "B": pb.key}
        module = f"{experts_module}.{p}"
        r, _ = ctx.cfg.rank_alpha(module)
        if A.shape[0] % r or B.shape[1] != A.shape[0]:
            raise ctx.fail(layer, pa.key, f"lora_A has {A.shape[0]} rows and lora_B {B.shape[1]} "
                           f"columns; expected both r*E with r={r} (from r / rank_pattern for "
                           f"{module!r})")
        E = A.shape[0] // r
        if num_experts is not None and E != num_experts:
            raise ctx.fail(layer, pa.key, f"expert count mismatch: {A.shape[0]} rows = r*E gives "
                           f"E={E} with r={r}, but the model has {num_experts} experts")
        scale = checked_scale(ctx, layer, pa.key, module, r)
        a_Eri = A.reshape(E, r, A.shape[1])  # expert-major
        b_oRE = B.reshape(B.shape[0], r, E)  # rank-major
        if legacy:
            a, b = b_oRE.permute(2, 1, 0), a_Eri.transpose(1, 2)
        else:
            a, b = a_Eri, b_oRE.permute(2, 0, 1)
        if p == "gate_up_proj" and interleaved:  # gpt-oss: gate rows at 2i, up at 2i + 1
            b = deinterleave_gate_up(b, dim=1)
        f = LoRAFactors(a=a.contiguous(), b=b.contiguous(), scaling=scale)
        if p == "gate_up_proj":
            out["gate"], out["up"] = split_block_diagonal(*split_gate_up(ctx, layer, pa.key, f))
        else:
            out["down"] = f
    return out, legacy, keys


def split_block_diagonal(gate: LoRAFactors, up: LoRAFactors) -> tuple[LoRAFactors, LoRAFactors]:
    """Undo PEFT's v4 -> v5 fusion when it is visible in the numbers (exact, halves the rank).

    PEFT 0.21 converts a transformers-4 adapter (separate gate and up LoRA of rank r) into one
    gate_up LoRA of rank 2r: ``A = cat(A_gate, A_up)`` and a block-diagonal ``B``. When the
    rank columns gate's ``b`` uses (nonzero in some expert) and those up's ``b`` uses are
    disjoint and both non-empty, gate and up get their own A restricted to their columns.
    Otherwise (a natively trained v5 adapter: dense B) the shared A is returned unchanged.

    Args / returns: ``gate``, ``up`` with ``a: [Ea, r, H]`` (the same tensor), ``b: [E, I, r]``.
    """
    used_gate = gate.b.ne(0).any(dim=1).any(dim=0)  # [r] bool
    used_up = up.b.ne(0).any(dim=1).any(dim=0)
    if not used_gate.any() or not used_up.any() or (used_gate & used_up).any():
        return gate, up
    cols_gate, cols_up = used_gate.nonzero().flatten(), used_up.nonzero().flatten()
    return (LoRAFactors(a=gate.a[:, cols_gate].contiguous(), b=gate.b[:, :, cols_gate].contiguous(),
                        scaling=gate.scaling),
            LoRAFactors(a=up.a[:, cols_up].contiguous(), b=up.b[:, :, cols_up].contiguous(),
                        scaling=up.scaling))


def _fits(ctx: Ctx, fac: dict) -> tuple[bool, bool]:
    """``(fits the current orientation, fits the peft <= 0.18 one)`` with the evidence at hand
    (model dims, and gate_up against down); both False when there is no evidence."""
    fits = _fit_lists(ctx, fac)
    return (bool(fits[False]) and all(fits[False]), bool(fits[True]) and all(fits[True]))


def _fit_lists(ctx: Ctx, fac: dict) -> dict[bool, list[bool]]:
    H, I = ctx.dims.hidden, ctx.dims.moe_intermediate
    fits = {False: [], True: []}  # per orientation: does each parameter's shape fit?
    for p, f in fac.items():
        a_in, b_out = f["A"][1].shape[1], f["B"][1].shape[0]
        out_dim, in_dim = _out_in(p, H, I)
        if out_dim is None or in_dim is None:
            continue
        fits[False].append((a_in, b_out) == (in_dim, out_dim))
        fits[True].append((a_in, b_out) == (out_dim, in_dim))
    if "gate_up_proj" in fac and "down_proj" in fac:
        gu_in, gu_out = fac["gate_up_proj"]["A"][1].shape[1], fac["gate_up_proj"]["B"][1].shape[0]
        dn_in, dn_out = fac["down_proj"]["A"][1].shape[1], fac["down_proj"]["B"][1].shape[0]
        fits[False].append(gu_in == dn_out and gu_out == 2 * dn_in)
        fits[True].append(gu_in == 2 * dn_out and gu_out == dn_in)
    return fits


def _orientation(ctx: Ctx, layer: int, fac: dict, key: str) -> bool:
    """True for the peft <= 0.18 orientation; see the module docstring for the rule."""
    H, I = ctx.dims.hidden, ctx.dims.moe_intermediate
    fits = _fit_lists(ctx, fac)
    new_ok, old_ok = _fits(ctx, fac)
    if new_ok != old_ok:
        return old_ok
    if fits[False] and not new_ok and not old_ok:
        shapes = {p: (tuple(f["A"][1].shape), tuple(f["B"][1].shape)) for p, f in fac.items()}
        expect = {p: f"lora_A [r*E, {_out_in(p, H, I)[1]}], lora_B [{_out_in(p, H, I)[0]}, r*E]"
                  for p in fac}
        raise ctx.fail(layer, key, f"shape mismatch: (lora_A, lora_B) shapes {shapes} fit neither "
                       f"orientation; expected {expect} (hidden={H}, intermediate={I})")
    version = ctx.cfg.peft_version
    if version is None:
        warnings.warn(f"{ctx.file}: layer {layer}: the orientation of the expert LoRA cannot be "
                      "read from the shapes and adapter_config.json has no peft_version; "
                      "assuming peft >= 0.19 (pass model_config to decide from shapes)",
                      stacklevel=3)
        return False
    return tuple(version[:2]) < _LEGACY_BEFORE
