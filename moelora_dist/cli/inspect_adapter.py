"""``moelora-dist inspect-adapter``: describe a PEFT adapter directory the way the pool sees it.

    moelora-dist inspect-adapter DIR [--model-config config.json] [--max-rank N] [--dtype bfloat16]

Prints the detected format, ranks and scales, the modules targeted per layer, the shared-outer
detection per MoE layer, and the bytes one pool slot needs. A pool slot holds, per MoE layer,
the buffers of :class:`moelora_dist.kernels.weights.MoELoRAWeights` with one slot, i.e.
``2R*H*Ea + 2I*R*E + R*I*E + H*R*Eb`` elements (``Ea = Eb = E``, or 1 in a pool built for
shared-outer adapters), for every MoE layer of the model (the pool allocates them whether the
adapter targets a layer or not), plus ``R*(in + out)`` per dense module the adapter targets.
``R`` is ``--max-rank`` (the pool's) or else the adapter's largest rank. With a full
``--model-config`` it also says whether the base is FP8 and what its weights and KV cache take.
"""

from __future__ import annotations

import argparse

import torch

from moelora_dist.adapters import CanonicalAdapter, load_adapter
from moelora_dist.adapters.config import ModelDims
from moelora_dist.dtypes import dtype_of
from moelora_dist.files.paths import read_json_object
from moelora_dist.kernels.weights import MoELoRAWeights

POOL_DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="DIR", help="PEFT adapter directory")
    p.add_argument("--model-config", default=None,
                   help="the model's config.json (checks shapes; counts every MoE layer)")
    p.add_argument("--max-rank", type=int, default=None,
                   help="the pool's max rank R (default: the adapter's largest rank)")
    p.add_argument("--dtype", choices=POOL_DTYPES, default="bfloat16", help="pool dtype")
    p.add_argument("--no-strict", action="store_true",
                   help="list and ignore keys the loader does not understand instead of failing")


def slot_bytes(dims: ModelDims, moe_layers: list[int], max_rank: int, dtype: torch.dtype,
               shared_outer_pool: bool) -> int:
    """Bytes of one pool slot over ``moe_layers`` (MoE buffers only, incl. per-slot flags)."""
    if not moe_layers:
        return 0
    bufs = MoELoRAWeights.zeros(1, dims.num_experts, max_rank, dims.hidden, dims.moe_intermediate,
                                dtype=dtype, device="meta", outer_shared_only=shared_outer_pool)
    return bufs.nbytes() * len(moe_layers)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


def _dims_from_adapter(adapter: CanonicalAdapter) -> ModelDims:
    """H, I, E read off the adapter itself when no model config is given."""
    for moe in adapter.moe.values():
        p = moe.projections()
        f = p.get("down")
        H = f.out_dim if f else next(iter(p.values())).in_dim
        I = f.in_dim if f else next(iter(p.values())).out_dim
        return ModelDims(hidden=H, moe_intermediate=I, num_experts=moe.num_experts)
    return ModelDims()


def describe(adapter: CanonicalAdapter, model_config: dict | None, max_rank: int | None,
             dtype: torch.dtype) -> str:
    """The text ``inspect-adapter`` prints (see the module docstring)."""
    dims = ModelDims.from_config(model_config) if model_config else _dims_from_adapter(adapter)
    cfg = adapter.config
    R = max_rank or adapter.max_rank
    lines = [f"adapter:   {adapter.name} ({adapter.source})",
             f"format:    {adapter.format}",
             f"config:    r={cfg.get('r')} lora_alpha={cfg.get('lora_alpha')} "
             f"use_rslora={bool(cfg.get('use_rslora'))} peft_version={cfg.get('peft_version')}",
             f"patterns:  rank_pattern={cfg.get('rank_pattern') or {}} "
             f"alpha_pattern={cfg.get('alpha_pattern') or {}}",
             f"max rank:  {adapter.max_rank}"]
    layers = sorted(set(adapter.moe) | {int(p.split(".")[1]) for p in adapter.dense
                                         if p.startswith("layers.")})
    lines.append("layer  module                          rank  scale     experts A/B  shared-outer")
    for layer in layers:
        moe = adapter.moe.get(layer)
        if moe is not None:
            shared = "yes" if moe.shared_outer else "no"
            for name, f in moe.projections().items():
                lines.append(f"{layer:>5}  experts.{name:<24} {f.rank:>4}  {f.scaling:<8.4g}  "
                             f"{f.a.shape[0]:>3}/{f.b.shape[0]:<3}      {shared}")
            if moe.gate_up_shared_a:
                lines.append(f"{layer:>5}  (gate and up share one A)")
            lines.append(f"{layer:>5}  (read as: {adapter.layer_formats.get(layer, '?')})")
        for path, f in sorted(adapter.dense.items()):
            if path.startswith(f"layers.{layer}."):
                mod = path[len(f"layers.{layer}."):]
                lines.append(f"{layer:>5}  {mod:<32} {f.rank:>4}  {f.scaling:<8.4g}")
    for path, f in sorted(adapter.dense.items()):
        if not path.startswith("layers."):
            lines.append(f"    -  {path:<32} {f.rank:>4}  {f.scaling:<8.4g}")
    if model_config:
        moe_layers = sorted(dims.moe_layers) if dims.moe_layers is not None else sorted(adapter.moe)
        scope = f"all {len(moe_layers)} MoE layers of the model"
    else:
        moe_layers = sorted(adapter.moe)
        scope = (f"the adapter's {len(moe_layers)} MoE layers "
                 "(no --model-config: H, I, E from the adapter)")
    elem = torch.empty((), dtype=dtype).element_size()
    dense = sum(R * (f.in_dim + f.out_dim) for f in adapter.dense.values()) * elem
    per_expert = slot_bytes(dims, moe_layers, R, dtype, False)
    lines.append(f"pool slot ({str(dtype).replace('torch.', '')}, R={R}, {scope}):")
    lines.append("  MoE buffers, per-expert outer factors: "
                 f"{_fmt_bytes(per_expert)} ({per_expert} bytes)")
    if adapter.moe and all(m.shared_outer for m in adapter.moe.values()):
        shared = slot_bytes(dims, moe_layers, R, dtype, True)
        lines.append("  MoE buffers, shared-outer pool:        "
                     f"{_fmt_bytes(shared)} ({shared} bytes)")
    lines.append(f"  dense modules ({len(adapter.dense)}):                  "
                 f"{_fmt_bytes(dense)} ({dense} bytes)")
    if model_config:
        lines += base_lines(model_config, elem)
    return "\n".join(lines)


def base_lines(model_config: dict, elem: int) -> list[str]:
    """The base model's precision and memory on one process (weights, KV bytes per token),
    when ``--model-config`` is a full config the runner accepts."""
    from moelora_dist.config.model import ModelConfig
    from moelora_dist.config.weight_bytes import weight_bytes
    from moelora_dist.errors import MoeloraError

    try:
        cfg = ModelConfig.from_dict(model_config)
    except MoeloraError as exc:
        return [f"base model: not sized ({exc})"]
    b = weight_bytes(cfg, elem)
    kind = f"FP8 ({cfg.fp8.describe()})" if cfg.fp8 is not None else "unquantized"
    return [f"base model: {cfg.arch}, {kind}",
            f"  weights on one process: {_fmt_bytes(b['fp8'] + b['other'])} (FP8 modules with "
            f"scales {_fmt_bytes(b['fp8'])}, other {_fmt_bytes(b['other'])}; divide the "
            "experts by ep and the rest by tp)",
            f"  KV cache: {_fmt_bytes(b['kv_per_token'])} per token (pages come with the engine)"]


def main(args: argparse.Namespace) -> int:
    from moelora_dist.cli.common import check_positive

    check_positive(args, "max_rank")
    model_config = (read_json_object(args.model_config, "--model-config")
                    if args.model_config else None)
    adapter = load_adapter(args.adapter, model_config=model_config, max_rank=args.max_rank,
                           strict=not args.no_strict)
    print(describe(adapter, model_config, args.max_rank, dtype_of(args.dtype, POOL_DTYPES)))
    return 0
