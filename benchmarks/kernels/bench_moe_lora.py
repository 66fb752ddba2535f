"""Benchmark of the fused MoE + multi-LoRA kernels against the base layer, the PyTorch
reference and the transformers peer (Qwen3MoeSparseMoeBlock, grouped_mm, +PEFT LoRA).

Run on a GPU (the device tool):

    PYTHONPATH=$PWD python3 -m benchmarks kernels --out benchmarks/results/current

Writes ``kernels_<device>.csv`` (one row per case; the first columns are device, versions,
git commit, UTC time and the roofline measured in this run) and ``kernels_<device>.png``. Each
case is checked against ``experts_reference`` before it is timed; a case that fails the check
gets ``ok=False`` and no ratio or speedup.

``--families`` adds (and ``--families-only`` runs only) DeepSeek-V3's routed shape on one rank
of EP 8 (H 7168, I 2048, 32 of 256 experts, grouped sigmoid top-8) and gpt-oss-120b (H 2880,
I 2880, 128 experts, top-4, biases and the clamped SwiGLU), base and 8 adapters r16 on every
token, T in 1..4096; their reference check runs up to T = 512 (the row-by-row reference is
too slow above: larger T are timed with ``checked=False``).
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from tqdm import tqdm

from benchmarks.common import device_tag, env_columns, measure_roofline, write_csv
from benchmarks.kernels.bench_common import (Case, bench, bench_graph, flops, make_inputs,
                                             make_peer, plot, touched_weight_bytes,
                                             variant_kwargs)
from benchmarks.kernels.bench_stages import stage_times, variant_times
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.kernels.moe_lora.ops import fused_moe_lora

log = logging.getLogger("bench_moe_lora")
T_ALL = (1, 8, 64, 512, 4096, 16384)
DECODE_MAX_T = 512  # up to here the roofline is HBM bytes; above it bf16 FLOPs


FAMILY_T = (1, 8, 64, 512, 4096)
FAMILY_CHECK_MAX_T = 512


def family_registry(quick: bool) -> list[Case]:
    """DeepSeek-V3 routed (EP 8) and gpt-oss-120b: base and 8 adapters r16 on every token."""
    Ts = (8, 64, 4096) if quick else FAMILY_T
    return [Case(m, T, a, r, s) for m in ("deepseek-v3-routed-ep8", "gpt-oss-120b")
            for T in Ts for a, r, s in ((0, 0, 0.0), (8, 16, 1.0))]


def registry(quick: bool) -> list[Case]:
    """The pruned cross product: every case a target needs, plus rank/share/adapter sweeps."""
    cases = []
    q = "qwen3-30b-a3b"
    for T in T_ALL:
        cases += [Case(q, T, 0, 0, 0.0),  # base layer
                  Case(q, T, 8, 16, 0.0),  # buffers loaded, no adapter in the batch
                  Case(q, T, 8, 16, 1.0),  # target: 8 adapters r16 on every token
                  Case(q, T, 8, 64, 1.0), Case(q, T, 1, 16, 1.0), Case(q, T, 8, 16, 0.5)]
    m = "mixtral-8x7b"
    for T in (1, 64, 4096, 16384):
        cases += [Case(m, T, 0, 0, 0.0), Case(m, T, 8, 16, 1.0), Case(m, T, 1, 64, 0.5)]
    if quick:
        cases = [c for c in cases if c.T in (8, 64, 4096)]
    return cases


def run_case(case: Case, time_reference: bool, roof: dict) -> dict:
    inp = make_inputs(case)
    ours = lambda: fused_moe_lora(**inp)  # noqa: E731
    y = ours()
    ts = inp["token_slot_T"]
    if ts is not None:  # what the batch info hands the reference: disabled slots -> -1
        en = inp["slot_enabled_S"][ts.clamp(min=0).long()]
        ts = torch.where((ts >= 0) & en, ts, torch.full_like(ts, -1))
    ref_args = (inp["x_TH"], inp["w_gate_up_EXH"], inp["w_down_EHI"], inp["topk_weights_TK"],
                inp["topk_ids_TK"], ts, inp["lora"])
    vkw = variant_kwargs(inp)
    family = case.model not in ("qwen3-30b-a3b", "mixtral-8x7b")
    checked = not (family and case.T > FAMILY_CHECK_MAX_T)
    if checked:
        want = experts_reference(*ref_args, **vkw)
        err = float((y.float() - want.float()).abs().max())
        scale = float(want.float().abs().max())
        ok = bool(err <= 4e-2 * max(scale, 1.0)) and not torch.isnan(y).any().item()
    else:  # timed unchecked (see the module docstring)
        err, scale, ok = float("nan"), float("nan"), not torch.isnan(y).any().item()
    row = dict(model=case.model, T=case.T, adapters=case.adapters, rank=case.rank,
               share=case.share, config=_config_name(case), ok=ok, checked=checked,
               max_err=err, ref_scale=scale)
    row["ms"] = bench(ours) if ok else float("nan")
    # Graphs at every T for Qwen3 too: the eager LoRA call issues more launches than the base
    # one, and the graph time shows how much of a prefill-size gap is host time.
    graph = case.T <= DECODE_MAX_T or case.model.startswith("qwen3")
    row["ms_graph"] = bench_graph(ours) if ok and graph else ""
    row["ref_ms"] = bench(lambda: experts_reference(*ref_args, **vkw)) if time_reference else ""
    t = row["ms"] * 1e-3
    row["hbm_pct"] = 100 * touched_weight_bytes(inp) / t / roof["hbm_bytes_per_s"]
    row["bf16_peak_pct"] = 100 * flops(inp) / t / roof["bf16_flops"]
    return row, inp


def _config_name(case: Case) -> str:
    if case.adapters == 0:
        return "base"
    return f"{case.adapters} adapters r{case.rank} share {case.share:g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for the CSV and PNG")
    ap.add_argument("--quick", action="store_true", help="T in {8, 64, 4096} only")
    ap.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    ap.add_argument("--stages", action="store_true", help="also time each kernel stage")
    ap.add_argument("--reference-t", type=int, nargs="*", default=[64, 4096],
                    help="T at which experts_reference is timed (it is slow)")
    ap.add_argument("--families", action="store_true",
                    help="add DeepSeek-V3 routed (EP 8) and gpt-oss-120b cases")
    ap.add_argument("--families-only", action="store_true",
                    help="run only the --families cases")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe_lora needs a CUDA GPU (run it through the device tool)")
    os.makedirs(args.out, exist_ok=True)
    roof = measure_roofline()
    meta = {**env_columns(), **roof}
    log.info("roofline measured in this run: HBM copy %.2f TB/s, bf16 GEMM %.0f TFLOP/s",
             roof["hbm_bytes_per_s"] / 1e12, roof["bf16_flops"] / 1e12)
    rows, base_ms, stage_rows = [], {}, []
    cases = [] if args.families_only else registry(args.quick)
    if args.families or args.families_only:
        cases += family_registry(args.quick)
    for case in tqdm(cases, desc="cases"):
        timed_ref = case.model.startswith("qwen3") and case.T in args.reference_t and (
            case.adapters in (0, 8) and case.share in (0.0, 1.0) and case.rank == 16
            or case.adapters == 0)
        try:
            row, inp = run_case(case, timed_ref, roof)
            row["vs_base"] = ""
        except torch.cuda.OutOfMemoryError as e:
            log.warning("%s: out of memory (%s)", case.name, e)
            continue
        key = (case.model, case.T)
        if case.adapters == 0:
            base_ms[key] = (row["ms"], row["ms_graph"])
        if key in base_ms:
            row["vs_base"] = row["ms"] / base_ms[key][0]
            if row["ms_graph"] != "":
                row["vs_base_graph"] = row["ms_graph"] / base_ms[key][1]
        if args.stages and case.model.startswith("qwen3") and case.T in (64, 4096, 16384) and (
                case.adapters == 0 or (case.adapters == 8 and case.rank == 16
                                       and case.share == 1.0)):
            for stage, ms in stage_times(inp).items():
                stage_rows.append(dict(case=case.name, stage=stage, ms=ms))
            _write_stages(args.out, stage_rows, meta)
            if case.T <= DECODE_MAX_T:
                for stage, ms in variant_times(inp, bench_graph).items():
                    stage_rows.append(dict(case=case.name, stage=f"variant {stage} (graph)", ms=ms))
            for stage, ms in variant_times(inp).items():
                stage_rows.append(dict(case=case.name, stage=f"variant {stage}", ms=ms))
            _write_stages(args.out, stage_rows, meta)
        row["ref_speedup"] = row["ref_ms"] / row["ms"] if row["ref_ms"] != "" else ""
        if not args.no_peer and case.model.startswith("qwen3") and case.adapters in (0, 8) \
                and case.share != 0.5 and case.rank in (0, 16, 64) and row["ok"]:
            peer_rank = case.rank if case.share > 0 else 0
            try:
                peer_ms = bench(make_peer(inp, peer_rank))
                rows.append(dict(model=case.model, T=case.T, adapters=case.adapters,
                                 rank=peer_rank, share=case.share,
                                 config="peer transformers" + (
                                     f" +PEFT r{peer_rank}" if peer_rank else ""),
                                 ok=True, ms=peer_ms))
                row["vs_peer"] = row["ms"] / peer_ms
            except Exception as e:  # the peer is informative only; never hide our numbers
                log.warning("%s: peer failed: %r", case.name, e)
        rows.append(row)
        log.info("%-44s ok=%s %.4f ms vs_base=%s", case.name, row["ok"], row["ms"],
                 row["vs_base"])
        del inp
        torch.cuda.empty_cache()
        _write(args.out, rows, meta, with_plot=False)  # a run cut short keeps its rows
    _write(args.out, rows, meta, with_plot=True)
    log.info("wrote %s", args.out)


def _write_stages(out, rows, meta):
    tag = device_tag(meta)
    write_csv(os.path.join(out, f"kernels_stages_{tag}.csv"), rows, meta)


def _write(out, rows, meta, with_plot):
    tag = device_tag(meta)
    write_csv(os.path.join(out, f"kernels_{tag}.csv"), rows, meta)
    if with_plot:
        plot(os.path.join(out, f"kernels_{tag}.png"), rows, meta)


if __name__ == "__main__":
    raise SystemExit(main())
