"""Per-format converters: checkpoint tensors of one MoE layer -> canonical :class:`LoRAFactors`.

Legend: E experts, H hidden, I expert intermediate, r rank (R: largest rank in a projection).

Two families, both normalized here to ``a: [Ea, r, in]``, ``b: [Eb, out, r]``:

* expert projections (per-expert 2-D keys, Mixtral ``w1/w3/w2``, stacked 3-D, shared 2-D):
  each factor is either one 2-D tensor per expert or one stacked tensor; A and B may use
  different styles (a shared-outer ``down`` is per-expert A plus one B). Ranks may differ per
  expert (``rank_pattern`` on ``experts.3.gate_proj``): smaller ones are zero-padded to R and
  per-expert scales are folded into the per-expert factor relative to the projection's scale.
* PEFT ``target_parameters`` (:func:`convert_param`): ``lora_A: [r*E, in]`` expert-major and
  ``lora_B: [out, r*E]`` rank-major; PEFT <= 0.18 wrote the transposed orientation
  (``lora_A: [r*E, out]``, ``lora_B: [in, r*E]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelora_dist.adapters.canonical import LoRAFactors
from moelora_dist.adapters.config import LoRAConfigView, ModelDims
from moelora_dist.adapters.errors import AdapterError
from moelora_dist.adapters.keys import ParsedKey


@dataclass
class Ctx:
    """What every converter needs to name things in errors and to resolve ranks and scales."""

    file: str
    cfg: LoRAConfigView
    dims: ModelDims

    def fail(self, layer: int, key: str, msg: str) -> AdapterError:
        where = f"layer {layer}, " if layer >= 0 else ""
        return AdapterError(f"{self.file}: {where}key {key!r}: {msg}")


def checked_scale(ctx: Ctx, layer: int, key: str, module: str, found: int) -> float:
    """The scale of ``module`` after checking its rank in the config equals the tensor's."""
    if found == 0:
        raise ctx.fail(layer, key, "rank 0 (the factor has no rank rows); drop the module or "
                       "re-export the adapter")
    r_cfg, alpha = ctx.cfg.rank_alpha(module)
    if r_cfg != found:
        raise ctx.fail(layer, key, f"adapter_config.json gives rank {r_cfg} for module "
                       f"{module!r} (r / rank_pattern) but the tensor has rank {found}; fix "
                       "rank_pattern or the tensor")
    return ctx.cfg.scaling(r_cfg, alpha)


def _as_stack(ctx: Ctx, layer: int, pk: ParsedKey, t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 2:
        return t.unsqueeze(0)
    if t.ndim == 3:
        return t
    raise ctx.fail(layer, pk.key, f"expected a 2-D or 3-D tensor, found shape {tuple(t.shape)}")


def convert_expert_projection(ctx: Ctx, layer: int, entries: list[tuple[ParsedKey, torch.Tensor]],
                              num_experts: int | None) -> LoRAFactors:
    """All keys of one (layer, projection) in the expert-projection family -> canonical factors.

    ``entries``: the ``lora_A`` / ``lora_B`` keys with their tensors: per expert ``A_e: [r_e, in]``,
    ``B_e: [out, r_e]``; or stacked ``A: [Ea, r, in]`` / ``[r, in]``, ``B: [Eb, out, r]`` /
    ``[out, r]``. ``num_experts``: E from the model config, or None to infer it.
    Returns ``a: [Ea, R, in]``, ``b: [Eb, out, R]`` (Ea/Eb in {1, E}) in the stored dtype.
    """
    per = {"A": {}, "B": {}}
    stacked: dict[str, tuple[ParsedKey, torch.Tensor]] = {}
    for pk, t in entries:
        if pk.expert is None:
            if pk.factor in stacked:
                raise ctx.fail(layer, pk.key, "duplicate stacked factor (also "
                               f"{stacked[pk.factor][0].key!r})")
            stacked[pk.factor] = (pk, _as_stack(ctx, layer, pk, t))
        else:
            if t.ndim != 2:
                raise ctx.fail(layer, pk.key, "per-expert factor must be 2-D, found "
                               f"{tuple(t.shape)}")
            per[pk.factor][pk.expert] = (pk, t)
    for f in "AB":
        if f in stacked and per[f]:
            raise ctx.fail(layer, stacked[f][0].key, f"both a stacked lora_{f} and per-expert "
                           f"lora_{f} keys (e.g. {next(iter(per[f].values()))[0].key!r}); keep one")
        if f not in stacked and not per[f]:
            other = entries[0][0].key
            raise ctx.fail(layer, other, f"lora_{f} of this projection is missing")
    sample = entries[0][0]
    stack_dims = [s.shape[0] for _, s in stacked.values() if s.shape[0] != 1]
    max_idx = max([e for f in "AB" for e in per[f]], default=-1)
    E = num_experts or max([max_idx + 1, *stack_dims, 1])
    for f, (pk, s) in stacked.items():
        if s.shape[0] not in (1, E):
            raise ctx.fail(layer, pk.key, f"expert count mismatch: stacked lora_{f} has "
                           f"{s.shape[0]} experts, expected {E} (or 1 for a shared factor)")
    if max_idx >= E:
        bad = next(pk for f in "AB" for e, (pk, _) in per[f].items() if e == max_idx)
        raise ctx.fail(layer, bad.key, f"expert count mismatch: expert index {max_idx} but the "
                       f"model has {E} experts")
    per_expert = bool(per["A"] or per["B"])
    if per["A"] and per["B"] and set(per["A"]) != set(per["B"]):
        e = sorted(set(per["A"]) ^ set(per["B"]))[0]
        have = "A" if e in per["A"] else "B"
        raise ctx.fail(layer, per[have][e][0].key, f"expert {e} has lora_{have} but no "
                       f"lora_{'B' if have == 'A' else 'A'}")
    targeted = sorted(per["A"] or per["B"]) if per_expert else list(range(E))

    def rank_of(e: int) -> tuple[int, str]:
        ra = per["A"][e][1].shape[0] if per["A"] else stacked["A"][1].shape[1]
        rb = per["B"][e][1].shape[1] if per["B"] else stacked["B"][1].shape[2]
        key = (per["A"][e][0] if per["A"] else stacked["A"][0]).key
        if ra != rb:
            raise ctx.fail(layer, key, f"rank mismatch: lora_A has rank {ra}, lora_B has rank {rb}")
        return ra, key

    ranks, scales = {}, {}
    for e in targeted:
        ranks[e], key = rank_of(e)
        module = (f"{sample.experts_module}.{e}.{sample.proj_name}" if per_expert
                  else f"{sample.experts_module}.{sample.proj_name}")
        scales[e] = checked_scale(ctx, layer, key, module, ranks[e])
    R = max(ranks.values())
    # per-expert A is [r, in] and B [out, r]; stacked ones carry a leading expert dim
    in_dims = {t.shape[-1] for _, t in _factor(per, stacked, "A")}
    out_dims = {t.shape[-2] for _, t in _factor(per, stacked, "B")}
    if len(in_dims) != 1 or len(out_dims) != 1:
        raise ctx.fail(layer, sample.key, "experts disagree on the input/output size: lora_A "
                       f"inputs {sorted(in_dims)}, lora_B outputs {sorted(out_dims)}")
    (d_in,), (d_out,) = in_dims, out_dims
    a = _stack_a(per["A"], stacked.get("A"), E, R, d_in)
    b = _stack_b(per["B"], stacked.get("B"), E, R, d_out)
    s_ref = scales[targeted[0]]
    if any(scales[e] != s_ref for e in targeted):
        # Different (r, alpha) per expert: fold each ratio into that expert's own factor.
        target = b if b.shape[0] == E else a
        for e in targeted:
            target[e] *= scales[e] / s_ref
    return LoRAFactors(a=a, b=b, scaling=s_ref)


def _factor(per, stacked, f):
    if per[f]:
        return list(per[f].values())
    return [stacked[f]]


def _stack_a(per: dict, stacked, E: int, R: int, d_in: int) -> torch.Tensor:
    """``[Ea, R, in]`` from per-expert ``[r_e, in]`` (missing experts stay zero) or a stack."""
    if stacked is not None:
        t = stacked[1]
        out = t if t.shape[1] == R else t.new_zeros(t.shape[0], R, d_in)
        if out is not t:
            out[:, : t.shape[1]] = t
        return out
    out = next(iter(per.values()))[1].new_zeros(E, R, d_in)
    for e, (_, t) in per.items():
        out[e, : t.shape[0]] = t
    return out


def _stack_b(per: dict, stacked, E: int, R: int, d_out: int) -> torch.Tensor:
    """``[Eb, out, R]`` from per-expert ``[out, r_e]`` (missing experts stay zero) or a stack."""
    if stacked is not None:
        t = stacked[1]
        out = t if t.shape[2] == R else t.new_zeros(t.shape[0], d_out, R)
        if out is not t:
            out[:, :, : t.shape[2]] = t
        return out
    out = next(iter(per.values()))[1].new_zeros(E, d_out, R)
    for e, (_, t) in per.items():
        out[e, :, : t.shape[1]] = t
    return out


def split_gate_up(ctx: Ctx, layer: int, key: str,
                  fused: LoRAFactors) -> tuple[LoRAFactors, LoRAFactors]:
    """A fused gate_up LoRA (``b: [Eb, 2I, r]``, gate rows first) -> gate and up sharing one A."""
    two_i = fused.b.shape[1]
    if two_i % 2:
        raise ctx.fail(layer, key, f"gate_up lora_B has {two_i} output rows; expected an even 2*I "
                       "(gate rows, then up rows)")
    i = two_i // 2
    gate = LoRAFactors(a=fused.a, b=fused.b[:, :i].contiguous(), scaling=fused.scaling)
    up = LoRAFactors(a=fused.a, b=fused.b[:, i:].contiguous(), scaling=fused.scaling)
    return gate, up
