"""Kernels launched and host time spent per layer by one eager decode step, on this tree or on
an older one, so the fusions (q/k/v in one GEMM, rotary and the per-head q/k norm in the page
write, residual adds in the norms, one paged-attention kernel) are counted before and after.

    python -m benchmarks launches --out benchmarks/results/current --label after
    (cd OLD && python -m benchmarks.engine.launches --out DIR --label before)

``OLD`` holds an older ``moelora_dist`` (e.g. ``git archive <commit> moelora_dist``: the
contiguous-KV-cache model before the engine) beside a copy of ``benchmarks/__init__.py`` and
``benchmarks/engine/{__init__,launches,shapes}.py``, with this tree's
``moelora_dist/config/shapes.py`` copied into it (``python -m`` puts the current directory
first on the path, before ``PYTHONPATH``); the script detects which API it imports. Model: Qwen3-30B-A3B's layer shape with ``--layers``
layers (default 4: per-layer figures do not depend on depth), random bf16 weights, 8 adapters
of rank 16 resident. For B in {1, 64} and no adapter / every token an adapter: kernels per
layer (CUDA kernel events of ``torch.profiler`` over one forward + LM head, over the layer
count), their GPU µs per layer in all and for the most expensive kernels by name (the LM head
and the step's once-per-forward kernels spread over the layers), and host ms per layer (best
of 5 forwards issued with no sync inside). One JSON line
per case in ``--out``/``launches.jsonl``. ``--host-profile``: also where that host time goes,
``cProfile`` over 5 forwards of each case, the functions by own time and by cumulative time, in
``--out``/``launches_host_<label>.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch

CTX = 512
TOP_KERNELS = 30  # kernels named in a row (by GPU time)


def _model(layers: int, fp8: bool = False):
    from benchmarks.engine.shapes import QWEN3_30B_A3B, random_adapter
    from moelora_dist.config.model import ModelConfig
    from moelora_dist.models.model import MoELoRAModel
    from moelora_dist.models.weights import RandomWeights
    from moelora_dist.parallel.groups import ParallelGroups

    raw = dict(QWEN3_30B_A3B, num_hidden_layers=layers)
    if fp8:  # as the engine benchmark's --fp8: block-FP8 experts and projections
        from benchmarks.engine.shapes import FP8_QUANTIZATION
        from moelora_dist.models.random_weights import RandomFP8Weights

        raw["quantization_config"] = FP8_QUANTIZATION
    cfg = ModelConfig.from_dict(raw)
    dev = torch.device("cuda", 0)
    source = (RandomFP8Weights if fp8 else RandomWeights)(cfg, torch.bfloat16, dev)
    model = MoELoRAModel.build(cfg, ParallelGroups.single(dev), source, dtype=torch.bfloat16,
                               max_loras=8, max_rank=16, progress=False)
    for i in range(8):
        model.pool.load(random_adapter(f"a{i}", cfg, 16, dev, 100 + i))
    return cfg, model


def _decode_inputs(model, B: int):
    """``(batch, cache)`` of B sequences of CTX cached tokens adding one each, in whichever
    API this tree has."""
    from moelora_dist.models import batch as batch_mod

    dev = model.device
    if hasattr(batch_mod, "PagedKVCache"):  # this tree: pages through block tables
        S = 16
        n = -(-(CTX + 1) // S)
        cache = model.new_cache(B * n, S)
        tables = [list(range(b * n, (b + 1) * n)) for b in range(B)]
        return batch_mod.ForwardBatch.build([1] * B, [CTX] * B, tables, S, dev), cache
    cache = model.new_cache(B, CTX + 1)  # before: one contiguous row per request
    return batch_mod.ForwardBatch.build([1] * B, [CTX] * B, dev,
                                        cache_rows=list(range(B))), cache


def measure(model, cfg, B: int, lora: bool, profile_title: str | None = None) -> dict:
    """One case's row; with ``profile_title`` also its host profile (:func:`host_profile`)
    under the key ``host_profile``."""
    from moelora_dist.lora.batch_info import build_batch_info

    dev = model.device
    batch, cache = _decode_inputs(model, B)
    slots = torch.tensor([b % 8 if lora else -1 for b in range(B)], dtype=torch.int32,
                         device=dev)
    ids = torch.randint(0, cfg.vocab_size, (B,), device=dev)

    def step():
        info = build_batch_info(batch.seg_indptr_B1, slots, model.pool.slot_rank_S)
        return model.logits(model.forward(ids, batch, cache, info)[-B:])

    with torch.no_grad():
        for _ in range(3):
            step()  # compile, warm caches
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t0)
            torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    cuda = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    L = cfg.num_layers
    by_name: dict[str, float] = {}
    for e in cuda:
        name = e.name[:70]
        by_name[name] = by_name.get(name, 0.0) + e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    extra = {} if profile_title is None else dict(host_profile=host_profile(step, profile_title))
    return dict(**extra, B=B, lora=lora, kernels_per_step=len(cuda),
                kernels_per_layer=round(len(cuda) / L, 1),
                host_ms_per_layer=round(1e3 * best / L, 4),
                kernel_us_per_layer=round(sum(by_name.values()) / L, 2),
                top_kernels_us_per_layer={k: round(v / L, 2) for k, v in top})


def host_profile(step, title: str, lines: int = 45) -> str:
    """cProfile of 5 forwards of ``step`` (already warm), issued with no sync inside."""
    prof = cProfile.Profile()
    with torch.no_grad():
        torch.cuda.synchronize()
        prof.enable()
        for _ in range(5):
            step()
        prof.disable()
        torch.cuda.synchronize()
    buf = io.StringIO()
    for key in ("tottime", "cumulative"):
        buf.write(f"### {title}: 5 forwards, by {key}\n")
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(lines)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="folder of launches.jsonl")
    ap.add_argument("--label", default="new")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--host-profile", action="store_true",
                    help="also cProfile each case's forwards into launches_host_<label>.txt")
    ap.add_argument("--fp8", action="store_true",
                    help="block-FP8 weights (experts and projections), as `engine --fp8`")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cfg, model = _model(args.layers, args.fp8)
    with open(os.path.join(args.out, "launches.jsonl"), "a") as f:
        for B in (1, 64):
            for lora in (False, True):
                title = f"{args.label} B={B} lora={lora}" if args.host_profile else None
                row = dict(label=args.label, layers=args.layers, fp8=args.fp8,
                           **measure(model, cfg, B, lora, title))
                text = row.pop("host_profile", None)
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")
                if text:
                    with open(os.path.join(args.out, f"launches_host_{args.label}.txt"),
                              "a") as hp:
                        hp.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
