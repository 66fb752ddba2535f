"""Which ``(tp, ep)`` layouts can split an FP8 checkpoint: its cuts of an input (column) dim
must fall on 128-column blocks.

The kernels quantize activations in groups of 128 columns, the groups of the weight scales. A
row-parallel layer (MoE ``down`` over MoE-TP, attention ``o_proj`` and dense ``down_proj`` over
TP) cuts its input columns across ranks; a group cut in two would need an all-reduce of its
amax before quantizing, and computing it per rank instead would change the numbers with the
layout. So such a cut must fall on a block boundary: ``I / moe_tp``, ``heads / tp * head_dim``
and ``F / tp`` must be multiples of 128 when the dim is split at all. Output-row cuts
(column-parallel layers, the gate/up halves) need nothing: their scale rows are re-blocked
(:func:`moelora_dist.models.fp8_weights.reblock_rows`).

The check reads only the config (which modules ``quantization_config`` converts), so it runs
before any process group is built; the loader enforces the same rule on the stored tensors.
"""

from __future__ import annotations

from moelora_dist.config.model import ModelConfig
from moelora_dist.config.quant import FP8_BLOCK
from moelora_dist.errors import MoeloraError
from moelora_dist.parallel.layout import Layout, LayoutError


def fp8_cut_problems(cfg: ModelConfig, tp: int, ep: int) -> list[str]:
    """Each FP8 input-dim cut of ``(tp, ep)`` that misses a block boundary, in words."""
    if cfg.fp8 is None:
        return []
    out = []
    moe_tp = tp // ep
    layer = cfg.moe_layers[0] if cfg.moe_layers else None
    if (layer is not None and moe_tp > 1 and cfg.moe_intermediate % moe_tp == 0
            and cfg.fp8.converts(f"model.layers.{layer}.{cfg.moe_prefix}.experts")
            and (cfg.moe_intermediate // moe_tp) % FP8_BLOCK):
        out.append(f"FP8 experts: I={cfg.moe_intermediate} over moe_tp = tp/ep = {tp}/{ep} = "
                   f"{moe_tp} gives shards of {cfg.moe_intermediate // moe_tp} columns of down")
    inner = cfg.attn_out  # heads x value dim (MLA: v_head_dim)
    if (tp > 1 and cfg.num_heads % tp == 0 and cfg.fp8.converts("model.layers.0.self_attn.o_proj")
            and (inner // tp) % FP8_BLOCK):
        out.append(f"FP8 o_proj: {cfg.num_heads} heads x {cfg.v_head_dim} = {inner} columns "
                   f"over tp={tp} gives shards of {inner // tp}")
    S_ = cfg.shared_intermediate
    if (layer is not None and S_ and tp > 1 and S_ % tp == 0 and (S_ // tp) % FP8_BLOCK
            and cfg.fp8.converts(f"model.layers.{layer}.mlp.shared_experts.down_proj")):
        out.append(f"FP8 shared experts' down_proj: {S_} columns over tp={tp} gives shards of "
                   f"{S_ // tp}")
    dense = cfg.dense_layers
    F_ = cfg.dense_intermediate
    if (dense and tp > 1 and F_ % tp == 0
            and cfg.fp8.converts(f"model.layers.{dense[0]}.mlp.down_proj") and (F_ // tp) % FP8_BLOCK):
        out.append(f"FP8 dense down_proj: intermediate_size={F_} over tp={tp} gives shards of "
                   f"{F_ // tp} columns")
    return out


def _fits(cfg: ModelConfig, tp: int, ep: int) -> bool:
    from moelora_dist.models.attention import HeadSplit
    from moelora_dist.models.mlp import dense_mlp_slice

    try:
        Layout(tp, tp, ep).check_model(cfg.num_experts, cfg.moe_intermediate)
        HeadSplit.for_rank(cfg, tp, 0)
        if cfg.dense_layers:
            dense_mlp_slice(cfg, tp, 0)
    except MoeloraError:
        return False
    return not fp8_cut_problems(cfg, tp, ep)


def nearest_layouts(cfg: ModelConfig, tp: int, ep: int, count: int = 4) -> list[tuple[int, int]]:
    """Up to ``count`` valid ``(tp, ep)`` with tp up to ``2 * tp`` (at least 8), nearest first."""
    cands = [(t, e) for t in range(1, max(2 * tp, 8) + 1) for e in range(1, t + 1)
             if t % e == 0 and _fits(cfg, t, e)]
    cands.sort(key=lambda c: (abs(c[0] - tp), abs(c[1] - ep), c))
    return cands[:count]


def check_fp8_layout(cfg: ModelConfig, tp: int, ep: int) -> None:
    """:class:`LayoutError` naming the cut, the numbers and the nearest valid layouts when an
    FP8 input dim of this layout is not cut on a 128-column block."""
    problems = fp8_cut_problems(cfg, tp, ep)
    if not problems:
        return
    near = ", ".join(f"--tp {t} --ep {e}" for t, e in nearest_layouts(cfg, tp, ep)) or "none"
    raise LayoutError(
        f"--tp {tp} --ep {ep} cannot split this FP8 checkpoint: {'; '.join(problems)}, not a "
        f"multiple of the {FP8_BLOCK}-column FP8 block (activations are quantized in groups of "
        f"{FP8_BLOCK} columns, and a group cannot span ranks); valid layouts nearby: {near} "
        "(or serve a bf16 checkpoint)")
