"""FP8 experts: FP8 base vs bf16 base, and FP8 + multi-LoRA vs FP8 base, one MoE layer's local
experts on one GPU, CUDA-graph replay (the decode path), random routing.

    PYTHONPATH=$PWD python3 -m benchmarks fp8 --out benchmarks/results/current --quick

Shapes (H, E_local, K, I): Qwen3-30B-A3B (2048, 128, 8, 768), Mixtral-8x7B (4096, 8, 2, 14336)
and DeepSeek-V3's routed experts at EP 8 (7168, 32 of 256, 8, 2048: tokens route top-8 over
256 experts, the 7 other ranks' experts are the sentinel -1 here). LoRA: 8 adapters of rank 16
over all tokens. T in 1..16384 (``--quick``: 16, 256, 16384).

Columns per row: ``ms`` (median of graph replays), ``base_bytes`` (expert weights the batch
touches: e4m3 values + fp32 scales for FP8, bf16 otherwise) and ``hbm_share`` /
``flop_share`` against :func:`benchmarks.common.measure_roofline` of this run; for FP8 base rows
``speedup_vs_bf16`` and the config's ``source`` (tuned or heuristic); ``fp8_base_inloop`` is
the same config with the activations quantized inside the GEMMs' K loops
(``fp8_prequant=False``) instead of by their own kernel; for LoRA rows ``lora_extra_ms`` (over the FP8 base), ``adapter_bytes``
(factors of the (slot, expert) pairs that have tokens), ``lora_floor_ms`` (those bytes at the
measured bandwidth), ``extra_over_floor`` and ``lora_over_base``. A case is checked against
``experts_reference`` (FP8 simulated) before timing where T <= 1024 (``ok``); larger T are
timed unchecked (``ok`` empty) to keep the run inside its budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

import torch
from tqdm import tqdm

from benchmarks.common import device_tag, env_columns, measure_roofline, write_csv
from benchmarks.kernels.bench_common import bench_graph
from moelora_dist.kernels.block_fp8.naive import quantize_weight
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.kernels.moe_lora.ops import config_for, config_source, fused_moe_lora
from moelora_dist.moe.router import localize_topk_ids, route
from moelora_dist.testing.kernel_cases import make_lora

log = logging.getLogger("bench_fp8")
SHAPES = {  # H, E_local, E_routed, K, I
    "qwen3-30b-a3b": (2048, 128, 128, 8, 768),
    "mixtral-8x7b": (4096, 8, 8, 2, 14336),
    "deepseek-v3-routed-ep8": (7168, 32, 256, 8, 2048),
}
T_ALL = (1, 16, 64, 256, 1024, 4096, 16384)
T_QUICK = (16, 256, 16384)
SLOTS, RANK = 8, 16
CHECK_MAX_T = 1024


def _weights(shape: str, g):
    H, E, _, _, I = SHAPES[shape]
    dev = dict(device="cuda", dtype=torch.bfloat16)
    w_gu = (torch.randn(E, 2 * I, H, generator=g, device="cuda") * H ** -0.5).to(**dev)
    w_d = (torch.randn(E, H, I, generator=g, device="cuda") * I ** -0.5).to(**dev)
    return (w_gu, w_d), (quantize_weight(w_gu), quantize_weight(w_d))


def _inputs(shape: str, T: int, g):
    H, E, E_all, K, I = SHAPES[shape]
    x = torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16)
    tw, ids = route(torch.randn(T, E_all, generator=g, device="cuda"), K, renormalize=True)
    return x, tw, localize_topk_ids(ids, 0, E)


def _lora(shape: str, T: int, ids, g):
    H, E, _, _, I = SHAPES[shape]
    lora = make_lora(SLOTS, E, RANK, H, I, torch.bfloat16, "cuda", g)
    per = -(-T // SLOTS)
    slot = (torch.arange(T, device="cuda") // per).to(torch.int32)
    enabled = torch.zeros(SLOTS, dtype=torch.bool, device="cuda")
    enabled[slot.unique().long()] = True
    pairs = torch.stack([slot[:, None].expand_as(ids).reshape(-1).long(), ids.reshape(-1).long()])
    pairs = pairs[:, pairs[1] >= 0].unique(dim=1).shape[1]
    adapter_bytes = pairs * 3 * RANK * (H + I) * 2  # A_gu, B_gu, A_d, B_d of each pair, bf16
    return dict(token_slot_T=slot, lora=lora, slot_enabled_S=enabled, num_lora_tokens=T), \
        adapter_bytes


def _touched(ids, w) -> int:
    n = int(ids[ids >= 0].unique().numel())
    E = w[0].shape[0]
    per_expert = sum(t.nbytes() if hasattr(t, "nbytes") and callable(t.nbytes)
                     else t.numel() * t.element_size() for t in w) // E
    return n * per_expert


def _ok(got, args, extra) -> bool:
    slot = extra.get("token_slot_T")
    want = experts_reference(*args, slot, extra.get("lora"))
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() + 1e-6
    return err <= 2e-2 * scale  # bf16 h and outputs, e4m3 rounding flips (tests/gpu bound)


def run(shapes, Ts, roof) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    bw, peak = roof["hbm_bytes_per_s"], roof["bf16_flops"]
    for shape in shapes:
        bf16_w, fp8_w = _weights(shape, g)
        H, E, _, K, I = SHAPES[shape]
        for T in tqdm(Ts, desc=shape, unit="T"):
            x, tw, ids = _inputs(shape, T, g)
            lora_kw, adapter_bytes = _lora(shape, T, ids, g)
            fl = 2.0 * int((ids >= 0).sum()) * 3 * H * I
            res = {}
            # the picked config without the pre-quantization: x and h quantized in the GEMMs'
            # K loops instead (MoEConfig.fp8_prequant)
            inloop = dict(config=dataclasses.replace(config_for(x, fp8_w[0], K, None),
                                                     fp8_prequant=False))
            for cfg, w, extra in (("bf16_base", bf16_w, {}), ("fp8_base_inloop", fp8_w, inloop),
                                  ("fp8_base", fp8_w, {}), ("fp8_lora8r16", fp8_w, lora_kw)):
                args = (x, *w, tw, ids)
                fn = lambda: fused_moe_lora(*args, **extra)  # noqa: E731
                ok = _ok(fn(), args, extra) if T <= CHECK_MAX_T else ""
                ms = bench_graph(fn)
                res[cfg] = ms
                base_bytes = _touched(ids, w)
                row = dict(shape=shape, T=T, config=cfg, ms=round(ms, 4), ok=ok,
                           base_bytes=base_bytes,
                           hbm_share=round(base_bytes / (ms * 1e-3) / bw, 3),
                           flop_share=round(fl / (ms * 1e-3) / peak, 3))
                if cfg.startswith("fp8_base"):
                    row["speedup_vs_bf16"] = round(res["bf16_base"] / ms, 3)
                    row["source"] = config_source(x, fp8_w[0], K, None)
                if cfg == "fp8_lora8r16":
                    extra_ms = ms - res["fp8_base"]
                    floor = adapter_bytes / bw * 1e3
                    row.update(lora_extra_ms=round(extra_ms, 4), adapter_bytes=adapter_bytes,
                               lora_floor_ms=round(floor, 4),
                               extra_over_floor=round(extra_ms / floor, 2),
                               lora_over_base=round(ms / res["fp8_base"], 3))
                rows.append(row)
                log.info("%s", row)
        del bf16_w, fp8_w
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks fp8", description=__doc__)
    p.add_argument("--out", default="benchmarks/results/current")
    p.add_argument("--quick", action="store_true", help=f"T in {T_QUICK} only")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = env_columns()
    roof = measure_roofline()
    rows = run(args.shapes, T_QUICK if args.quick else T_ALL, roof)
    path = os.path.join(args.out, f"fp8_{device_tag(env)}.csv")
    write_csv(path, rows, {**env, **{k: f"{v:.4g}" for k, v in roof.items()}})
    print(f"wrote {path}")
    return 0
