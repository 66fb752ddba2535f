"""Simulated-rank check: every layout's per-rank outputs sum to the one-process reference.

Legend: T tokens, H hidden, E experts (E_l local), I intermediate (I_l local), K top-k,
B requests, r rank.

For each valid ``(world, tp, ep)`` with ``world <= max_world``, one process plays every rank
with a mocked :class:`RankLayout`: it slices the base weights (its EP rank's experts, its
MoE-TP rank's rows of I), builds a :class:`LoRAPool` for that rank (which slices the adapters),
maps experts it does not own to ``-1`` and runs :func:`experts_reference`. What the
all-reduce dispatcher would add up — the outputs of the ranks of one TP group — must equal
the reference computed on one process from merged weights ``W + s B A`` (fp64). The check
covers slicing, the pool's writes (shared-outer and per-expert adapters side by side, a
previous tenant evicted), batch info and sentinels; it launches no process.

``SimConfig.variant``: ``"families"`` (default) routes like DeepSeek-V3 / GLM-4.5 (sigmoid
scores, a correction bias that only chooses, expert groups, a scaling factor) and computes
the experts like gpt-oss (gate_up and down biases, the clamped SwiGLU at ``limit = 1``): the
down bias must be added by exactly one rank of each MoE-TP group for the sums to match.
``"classic"``: softmax top-k, SiLU experts without biases.

Entry point: ``moelora-dist sweep --simulate`` (:mod:`moelora_dist.cli.sweep`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA
from moelora_dist.lora.batch_info import build_batch_info
from moelora_dist.lora.pool import LoRAPool, MoELayerSpec, PoolConfig
from moelora_dist.kernels.constants import Activation
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.moe.router import localize_topk_ids, route, route_sigmoid_grouped
from moelora_dist.parallel.layout import Layout, LayoutError, RankLayout, divisors

VARIANTS = ("families", "classic")
SWIGLU = Activation("swiglu_oai", 1.702, 1.0)

LAYER = 0  # the one MoE layer of the simulated model


def random_moe_lora(E: int, H: int, I: int, rank: int, g: torch.Generator, *,
                    projections=("gate", "up", "down"), shared_outer: bool = False,
                    shared_gate_up_a: bool = False, gate_a_shared_only: bool = False,
                    dtype=torch.float64, std: float = 0.3) -> MoELayerLoRA:
    """A random full-size MoE LoRA layer (see :mod:`moelora_dist.adapters.canonical`).

    ``shared_outer``: gate/up A and down B have expert dim 1. ``shared_gate_up_a``: gate and
    up share one A tensor (PEFT ``target_parameters``). ``gate_a_shared_only``: only gate's A
    is shared (a mixed layout the pool must broadcast). Scalings differ per projection.
    """
    rn = lambda *s: torch.randn(*s, generator=g, dtype=dtype) * std
    eo = 1 if shared_outer else E
    layer = MoELayerLoRA(E)
    a_gate = rn(1 if gate_a_shared_only else eo, rank, H)
    if "gate" in projections:
        layer.gate = LoRAFactors(a_gate, rn(E, I, rank), 2.0 / rank)
    if "up" in projections:
        a_up = a_gate if shared_gate_up_a else rn(eo, rank, H)
        layer.up = LoRAFactors(a_up, rn(E, I, rank), 1.5 / rank)
    if "down" in projections:
        layer.down = LoRAFactors(rn(E, rank, I), rn(eo, H, rank), 3.0 / rank)
    return layer


@dataclass
class SimConfig:
    """The simulated model and batch. ``tol``: largest passing error relative to max |y|."""

    max_world: int = 8
    experts: int = 24
    hidden: int = 16
    intermediate: int = 840
    top_k: int = 2
    tokens: int = 24
    seed: int = 0
    tol: float = 1e-10
    device: str = "cpu"  # where each rank's pool and computation run ("cuda" on a GPU)
    outer_shared_only: bool = False  # shared-outer adapters only, in outer_shared_only pools
    variant: str = "families"  # see the module docstring

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for k in ("max_world", "experts", "hidden", "intermediate", "top_k", "tokens"):
            v = getattr(self, k)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")


@dataclass
class SimCase:
    """Inputs of one simulated batch and its one-process reference output ``y_ref_TH``."""

    cfg: SimConfig
    x_TH: torch.Tensor
    w_gate_up_EXH: torch.Tensor  # [E, 2I, H]
    w_down_EHI: torch.Tensor  # [E, H, I]
    topk_weights_TK: torch.Tensor
    topk_ids_TK: torch.Tensor
    seg_indptr_B1: torch.Tensor
    requests: list[str | None]
    registry: dict[str, CanonicalAdapter]
    decoy: CanonicalAdapter
    b_gate_up_EX: torch.Tensor | None = None  # [E, 2I] (families variant)
    b_down_EH: torch.Tensor | None = None  # [E, H]
    y_ref_TH: torch.Tensor | None = None  # [T, H] fp64, set by build_case
    lora_effect: float = 0.0  # max |y_ref - y_base| / max |y_ref|: the check is not vacuous


@dataclass
class SimRow:
    world: int
    tp: int
    ep: int
    moe_tp: int
    max_abs_err: float = float("nan")
    max_rel_err: float = float("nan")
    passed: bool = False
    skipped: str | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def build_case(cfg: SimConfig) -> SimCase:
    """Random fp64 weights, five adapters of different kinds and ranks (all shared-outer when
    ``cfg.outer_shared_only``), eight requests (two base-only, one empty), and the
    merged-weight reference."""
    g = torch.Generator().manual_seed(cfg.seed)
    E, H, I, T = cfg.experts, cfg.hidden, cfg.intermediate, cfg.tokens
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    if cfg.outer_shared_only:
        kinds = {
            "shared_outer_r4": dict(rank=4),
            "shared_outer_r8": dict(rank=8),
            "shared_outer_fused_r6": dict(rank=6, shared_gate_up_a=True),
            "shared_outer_down_r3": dict(rank=3, projections=("down",)),
            "shared_outer_gate_up_r5": dict(rank=5, projections=("gate", "up")),
        }
        kinds = {n: dict(kw, shared_outer=True) for n, kw in kinds.items()}
    else:
        kinds = {
            "per_expert_r8": dict(rank=8),
            "shared_outer_r4": dict(rank=4, shared_outer=True),
            "fused_gate_up_r6": dict(rank=6, shared_gate_up_a=True),
            "down_only_r3": dict(rank=3, projections=("down",)),
            "gate_a_shared_r5": dict(rank=5, gate_a_shared_only=True),
        }
    registry = {n: CanonicalAdapter(n, moe={LAYER: random_moe_lora(E, H, I, g=g, **kw)})
                for n, kw in kinds.items()}
    decoy = CanonicalAdapter("decoy_r8", moe={LAYER: random_moe_lora(
        E, H, I, 8, g, shared_outer=cfg.outer_shared_only)})
    names = list(kinds)
    requests = [names[0], None, names[1], names[2], names[3], None, names[4], names[0]]
    cuts = torch.randint(0, T + 1, (len(requests) - 1,), generator=g).sort().values
    cuts[2] = cuts[1]  # one empty request: its adapter must not break anything
    seg_indptr = torch.cat([torch.tensor([0]), cuts, torch.tensor([T])]).to(torch.int32)
    logits = rn(T, E)
    if cfg.variant == "families":
        groups = 2 if E % 2 == 0 and E // 2 >= max(2, cfg.top_k) else 1
        topk_w, topk_ids = route_sigmoid_grouped(logits, rn(E) * 0.1, cfg.top_k, groups, 1,
                                                 True, 1.5)
    else:
        topk_w, topk_ids = route(logits, cfg.top_k, renormalize=True)
    case = SimCase(cfg, rn(T, H), rn(E, 2 * I, H) / H ** 0.5, rn(E, H, I) / I ** 0.5,
                   topk_w.to(torch.float64), topk_ids, seg_indptr, requests, registry, decoy)
    if cfg.variant == "families":
        case.b_gate_up_EX, case.b_down_EH = rn(E, 2 * I) * 0.3, rn(E, H) * 0.3
    case.y_ref_TH = merged_reference(case)
    base = experts_reference(case.x_TH, case.w_gate_up_EXH, case.w_down_EHI,
                             case.topk_weights_TK, case.topk_ids_TK, **_variant_args(case))
    scale = float(case.y_ref_TH.abs().max())
    case.lora_effect = float((case.y_ref_TH - base).abs().max()) / scale
    return case


def _variant_args(case: SimCase, experts=slice(None), rows=slice(None),
                  with_down_bias: bool = True) -> dict:
    """``experts_reference`` keywords of the case's variant: activation and biases (the
    rank's experts and gate/up rows; the down bias only where ``with_down_bias``)."""
    if case.cfg.variant == "classic":
        return {}
    return dict(activation=SWIGLU, b_gate_up_EX=case.b_gate_up_EX[experts][:, rows],
                b_down_EH=case.b_down_EH[experts] if with_down_bias else None)


def _delta(f: LoRAFactors | None, e: int, shape) -> torch.Tensor:
    if f is None:
        return torch.zeros(shape, dtype=torch.float64)
    a = f.a[0 if f.a_shared else e].double()
    b = f.b[0 if f.b_shared else e].double()
    return f.scaling * (b @ a)


def merged_reference(case: SimCase) -> torch.Tensor:
    """``[T, H]`` fp64: each request run alone on merged weights ``W + s B A``, no pool."""
    E, H, I = case.cfg.experts, case.cfg.hidden, case.cfg.intermediate
    y = torch.zeros_like(case.x_TH)
    seg = case.seg_indptr_B1.tolist()
    for b, name in enumerate(case.requests):
        rows = slice(seg[b], seg[b + 1])
        w_gu, w_d = case.w_gate_up_EXH, case.w_down_EHI
        if name is not None:
            layer = case.registry[name].moe[LAYER]
            w_gu = w_gu + torch.stack([torch.cat([_delta(layer.gate, e, (I, H)),
                                                  _delta(layer.up, e, (I, H))]) for e in range(E)])
            w_d = w_d + torch.stack([_delta(layer.down, e, (H, I)) for e in range(E)])
        y[rows] = experts_reference(case.x_TH[rows], w_gu, w_d, case.topk_weights_TK[rows],
                                    case.topk_ids_TK[rows], **_variant_args(case))
    return y


def rank_output(case: SimCase, rank_layout: RankLayout) -> torch.Tensor:
    """``[T, H]`` fp64 partial output of one mocked rank: its experts, its rows of I.

    The pool, the sliced base weights and the computation live on ``case.cfg.device``; the
    adapters stay on the CPU, as a loader hands them over. The result comes back on the CPU.
    """
    cfg = case.cfg
    dev = torch.device(cfg.device)
    shard = rank_layout.moe_shard(cfg.experts, cfg.intermediate)
    es, i0, i1, I = slice(shard.expert_start, shard.expert_end), shard.i_start, shard.i_end, \
        cfg.intermediate
    w_gu = case.w_gate_up_EXH[es]
    w_gu_local = torch.cat([w_gu[:, i0:i1], w_gu[:, I + i0:I + i1]], dim=1)  # gate rows, up rows
    w_d_local = case.w_down_EHI[es, :, i0:i1]
    max_rank = max(a.max_rank for a in [case.decoy, *case.registry.values()])
    pool = LoRAPool(PoolConfig(max_loras=len(case.registry), max_rank=max_rank,
                               dtype=torch.float64, device=dev,
                               outer_shared_only=cfg.outer_shared_only),
                    rank_layout, {LAYER: MoELayerSpec(cfg.experts, cfg.hidden, cfg.intermediate)})
    pool.load(case.decoy)  # a previous tenant the batch must evict without a trace
    req_to_slot = pool.prepare_batch(case.requests, case.registry)
    info = build_batch_info(case.seg_indptr_B1.to(dev), req_to_slot, pool.slot_rank_S)
    local_ids = localize_topk_ids(case.topk_ids_TK.to(dev), shard.expert_start,
                                  shard.num_local_experts)
    gu_rows = torch.cat([torch.arange(i0, i1), torch.arange(I + i0, I + i1)])
    # The down bias rides on the MoE-TP partial sums: the rank with the first I slice adds it.
    kw = {k: v.to(dev) if torch.is_tensor(v) else v
          for k, v in _variant_args(case, es, gu_rows, with_down_bias=i0 == 0).items()}
    y = experts_reference(case.x_TH.to(dev), w_gu_local.to(dev), w_d_local.to(dev),
                          case.topk_weights_TK.to(dev), local_ids, info.token_slot_T,
                          pool.moe_buffers(LAYER), **kw)
    pool.release_batch()
    return y.cpu()


def simulate_layout(case: SimCase, layout: Layout) -> SimRow:
    """Check one layout; every DP replica's TP group is summed and compared separately."""
    cfg = case.cfg
    row = SimRow(layout.world_size, layout.tp, layout.ep, layout.moe_tp)
    try:
        layout.check_model(cfg.experts, cfg.intermediate)
    except LayoutError as exc:
        row.skipped = str(exc)
        return row
    scale = float(case.y_ref_TH.abs().max())
    try:
        err = 0.0
        for group in layout.tp_groups:
            y = sum(rank_output(case, RankLayout(layout, r)) for r in group)
            err = max(err, float((y - case.y_ref_TH).abs().max()))
    except Exception as exc:  # a broken layout is a failed row, not a dead sweep
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    row.max_abs_err, row.max_rel_err = err, err / scale
    row.passed = row.max_rel_err <= cfg.tol
    return row


def all_layouts(max_world: int) -> list[Layout]:
    """Every ``(world, tp, ep)`` with ``world <= max_world``, ``tp | world``, ``ep | tp``."""
    return [Layout(w, tp, ep) for w in range(1, max_world + 1)
            for tp in divisors(w) for ep in divisors(tp)]


def run_simulation(cfg: SimConfig, progress: bool = True) -> tuple[SimCase, list[SimRow]]:
    """Build the case once, then check every layout (with a tqdm bar when ``progress``)."""
    from tqdm import tqdm

    case = build_case(cfg)
    layouts = all_layouts(cfg.max_world)
    rows = []
    for layout in tqdm(layouts, desc="simulated layouts", unit="layout", disable=not progress):
        rows.append(simulate_layout(case, layout))
    return case, rows
