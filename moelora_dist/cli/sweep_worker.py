"""One world size of ``moelora-dist sweep``: runs on every rank under the launcher.

    python -m launch --nproc-per-node 4 sweep-worker --checkpoint DIR --out rows.jsonl
    torchrun --nproc-per-node 4 -m moelora_dist.cli.sweep_worker --checkpoint DIR --out rows.jsonl

For every layout of this world size that fits the model and every dispatcher asked for, each
rank builds the tiny model from its slices of the safetensors checkpoint and a LoRA pool,
runs one mixed batch (several adapters and base-only requests) through layer 0 alone and
through the whole stack, and compares with the same model on one process (full weights,
``ParallelGroups.single()``). The worst error over all ranks is reduced to rank 0, which
appends one JSON row per case to ``--out`` as soon as it is known (the parent's progress
bar follows that file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
import torch.distributed as dist

from moelora_dist.cli.common import job_entry
from moelora_dist.dtypes import DTYPES, dtype_of
from moelora_dist.errors import OptionError
from moelora_dist.logs import setup_logging
from moelora_dist.testing import tiny
from moelora_dist.parallel.groups import ParallelGroups, destroy_parallel, init_parallel
from moelora_dist.parallel.layout import valid_layouts

log = logging.getLogger(__name__)
# Largest passing max-abs error relative to max |y|. The reference runs the same kernels on
# one process, so only the order of the partial sums differs: a few ulps of the dtype,
# grown by three layers and the LoRA deltas.
DEFAULT_TOL = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def lora_effect_floor(tol: float) -> float:
    """How much the adapters must move the output (relative to max |y|) for a case to count:
    ten times the tolerance, so a LoRA bug of the size of the effect cannot hide in it."""
    return 10 * tol


def default_tol(dtype: str, device_type: str) -> float:
    """Triton runs fp32 products as TF32 on GPUs: 2e-3 there instead of 1e-4."""
    if dtype == "float32" and device_type == "cuda":
        return 2e-3
    return DEFAULT_TOL[dtype]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="tiny model directory (safetensors)")
    p.add_argument("--out", required=True, help="JSON-lines file rank 0 appends rows to")
    p.add_argument("--layouts", default=None,
                   help="comma list of TPxEP to run, e.g. 4x2,2x1 (default: every valid one)")
    p.add_argument("--dispatchers", default="all_reduce,all_to_all")
    p.add_argument("--adapters", default=None, help="comma list of built-in adapter names")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--tol", type=float, default=None)


def parse_layouts(text: str | None) -> set[tuple[int, int]] | None:
    if not text:
        return None
    out = set()
    for item in text.split(","):
        try:
            tp, ep = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise OptionError(f"--layouts {item!r} is not TPxEP (e.g. 4x2)") from None
        out.add((tp, ep))
    return out


def request_names(adapter_names: list[str]) -> list[str | None]:
    """Every adapter once, base-only requests between them, the first adapter again."""
    names: list[str | None] = []
    for n in adapter_names:
        names += [n, None]
    return names + adapter_names[:1]


def run_model(cfg, checkpoint, groups: ParallelGroups, dispatcher: str, names, registry,
              num_tokens: int, seed: int, dtype: torch.dtype):
    """``(layer-0 output, stack output)``, each ``[T, H]``, for one batch on ``groups``."""
    pool = tiny.make_pool(cfg, groups.rank_layout, dtype=dtype, device=groups.device)
    stack = tiny.load_stack(cfg, checkpoint, groups, pool, dispatcher=dispatcher, dtype=dtype)
    x, seg = tiny.make_requests(cfg, num_tokens, names, seed, dtype=dtype, device=groups.device)
    info = tiny.batch_info_for(pool, names, registry, seg)
    with torch.no_grad():
        y_layer = stack.layers[0](tiny.rms_norm(x), info)
        y_stack = stack(x, info)
    pool.release_batch()
    return y_layer, y_stack


def _errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    abs_err = (y.double() - ref.double()).abs().max().item() if y.numel() else 0.0
    return abs_err, abs_err / (ref.double().abs().max().item() + 1e-30)


def main(args: argparse.Namespace) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = tiny.TinyMoEConfig(**{k: v for k, v in json.loads(
        open(os.path.join(args.checkpoint, "config.json")).read()).items()
        if k in tiny.TinyMoEConfig.__dataclass_fields__})
    dtype = dtype_of(args.dtype)
    registry = {a.name: a for a in tiny.make_adapters(cfg)}
    chosen = args.adapters.split(",") if args.adapters else list(registry)
    unknown = [n for n in chosen if n not in registry]
    if unknown:
        raise OptionError(f"--adapters {unknown} are unknown; built-in ones: {sorted(registry)}")
    names = request_names(chosen)
    wanted = parse_layouts(args.layouts)
    layouts = [lay for lay in valid_layouts(world, cfg.num_experts, cfg.intermediate)
               if wanted is None or (lay.tp, lay.ep) in wanted]
    dispatchers = args.dispatchers.split(",")
    first = init_parallel(layouts[0].tp, layouts[0].ep) if layouts else None
    tol = args.tol if args.tol is not None else default_tol(
        args.dtype, first.device.type if first else "cpu")
    try:
        single = ParallelGroups.single(first.device if first else "cpu")
        ref = run_model(cfg, args.checkpoint, single, "all_reduce", names, registry,
                        args.tokens, args.seed, dtype)
        base = run_model(cfg, args.checkpoint, single, "all_reduce", [None] * len(names),
                         registry, args.tokens, args.seed, dtype)
        # How much the adapters move the stack output: near 0 would make the check vacuous.
        lora_effect = _errors(base[1], ref[1])[1]
        for layout in layouts:
            groups = init_parallel(layout.tp, layout.ep)
            for dispatcher in dispatchers:
                t0 = time.perf_counter()
                out = run_model(cfg, args.checkpoint, groups, dispatcher, names, registry,
                                args.tokens, args.seed, dtype)
                errs = [*_errors(out[0], ref[0]), *_errors(out[1], ref[1])]
                worst = torch.tensor(errs, dtype=torch.float64, device=groups.device)
                if world > 1:  # the worst rank decides; the world group is named explicitly
                    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=dist.group.WORLD)
                la, lr, sa, sr = worst.tolist()
                if groups.is_rank0:
                    row = dict(world=world, tp=layout.tp, ep=layout.ep, moe_tp=layout.moe_tp,
                               dispatcher=dispatcher, layer_abs_err=la, layer_rel_err=lr,
                               stack_abs_err=sa, stack_rel_err=sr, max_abs_err=max(la, sa),
                               max_rel_err=max(lr, sr), tol=tol, dtype=args.dtype,
                               lora_effect=lora_effect,
                               passed=(max(lr, sr) <= tol
                                       and lora_effect > lora_effect_floor(tol)),
                               seconds=time.perf_counter() - t0)
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    log.info("%s %s: max rel err %.2e", layout, dispatcher, row["max_rel_err"])
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    setup_logging()
    job_entry(__doc__, add_arguments, main)
