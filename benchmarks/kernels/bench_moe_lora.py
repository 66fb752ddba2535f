"""Benchmark of the fused MoE + multi-LoRA kernels against the base layer, the PyTorch
reference, the transformers peer (Qwen3MoeSparseMoeBlock, grouped_mm, +PEFT LoRA) and, as
reference rows, the vLLM / SGLang numbers of issue 16's table (``peers.py``).

Run on a GPU (the device tool):

    PYTHONPATH=$PWD python3 -m benchmarks kernels --out benchmarks/results/current

Writes ``kernels_<device>.csv`` (one row per case; the first columns are device, versions,
git commit, UTC time and the roofline measured in this run) and ``kernels_<device>.png``. Each
case is checked against ``experts_reference`` (on sampled rows, exact for any batch) before it
is timed; a case that fails the check gets ``ok=False`` and no ratio or speedup. Per case: its
own roofline (base weights touched + adapter factors touched over the measured HBM bandwidth;
FLOPs over the measured bf16 peak; ``roofline.py``) and its share of it; for LoRA cases the
extra time over the base layer against the adapters' own floor; ``config_source`` says whether
the tiles came from a tuned file; ``target``/``target_met`` judge issue 16's targets.

``--families`` adds (and ``--families-only`` runs only) DeepSeek-V3's routed shape on one rank
of EP 8 routed by its own grouped sigmoid router (H 7168, I 2048, 32 of 256 experts, top-8 in
4 of 8 groups) and gpt-oss-120b (H 2880, I 2880, 128 experts, top-4, biases and the clamped
SwiGLU), base and 8 adapters r16 on every token, T in 1..4096.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
from tqdm import tqdm

from benchmarks.common import device_tag, env_columns, measure_roofline, write_csv
from benchmarks.kernels import peers, roofline, targets
from benchmarks.kernels.bench_common import (Case, bench, bench_graph, flops, make_inputs,
                                             make_peer, plot, touched_weight_bytes,
                                             variant_kwargs)
from benchmarks.kernels.bench_stages import stage_times, variant_times
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.kernels.moe_lora.ops import config_source, fused_moe_lora
from moelora_dist.tuning.measure import check
from moelora_dist.tuning.problems import reference_rows

log = logging.getLogger("bench_moe_lora")
T_ALL = (1, 16, 64, 256, 1024, 4096, 16384)  # the table's T, and 16384 for the peak target
DECODE_MAX_T = 512  # up to here the roofline is HBM bytes; above it bf16 FLOPs
TOLERANCE = 4e-2  # of max |reference|: bf16 h and pair outputs, tf32 expand


FAMILY_T = (1, 16, 64, 256, 1024, 4096)


def family_registry(quick: bool) -> list[Case]:
    """DeepSeek-V3 routed by its grouped router (EP 8) and gpt-oss-120b: base and 8 adapters
    r16 on every token (the base case of a (model, T) first)."""
    Ts = (16, 64, 4096) if quick else FAMILY_T
    return [Case(m, T, a, r, s) for m in ("deepseek-v3-grouped", "gpt-oss-120b")
            for T in Ts for a, r, s in ((0, 0, 0.0), (8, 16, 1.0))]


def registry(quick: bool) -> list[Case]:
    """The pruned cross product: every case a target needs, plus rank/share/adapter sweeps.
    The base case of a (model, T) comes first: the LoRA rows' extra time is measured on it."""
    cases = []
    q = "qwen3-30b-a3b"
    for T in T_ALL:
        cases += [Case(q, T, 0, 0, 0.0),  # base layer
                  Case(q, T, 8, 16, 0.0),  # buffers loaded, no adapter in the batch
                  Case(q, T, 8, 16, 1.0),  # target: 8 adapters r16 on every token
                  Case(q, T, 8, 64, 1.0)]  # target: rank 64 within 1.5x its floor
        if T in (16, 256, 4096):
            cases += [Case(q, T, 1, 16, 1.0), Case(q, T, 8, 16, 0.5)]
    for T in T_ALL:
        cases += [Case("mixtral-8x7b", T, 0, 0, 0.0), Case("mixtral-8x7b", T, 8, 16, 1.0)]
        if T in (64, 4096):
            cases.append(Case("mixtral-8x7b", T, 1, 64, 0.5))
    for model in ("olmoe", "deepseek-v3-routed"):
        for T in (1, 64, 1024, 16384):
            cases += [Case(model, T, 0, 0, 0.0), Case(model, T, 8, 16, 1.0)]
    if quick:
        cases = [c for c in cases if c.T in (16, 64, 4096)]
    return cases


def _touches_every_expert(inp) -> bool:
    ids = inp["topk_ids_TK"]
    return int(ids[ids >= 0].unique().numel()) == inp["w_gate_up_EXH"].shape[0]


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
    vkw = variant_kwargs(inp)  # gpt-oss: activation and biases (reference_rows reads them)
    ref = reference_rows(inp)
    why = check(y, ref, tolerance=TOLERANCE)
    ok = why is None
    if not ok:
        log.warning("%s: %s", case.name, why)
    K = inp["topk_ids_TK"].shape[1]
    row = dict(model=case.model, T=case.T, adapters=case.adapters, rank=case.rank,
               share=case.share, config=_config_name(case), ok=ok,
               max_err=ref.error(y) * ref.scale, ref_scale=ref.scale,
               config_source=config_source(inp["x_TH"], inp["w_gate_up_EXH"], K, inp["lora"]))
    row["ms"] = bench(ours) if ok else float("nan")
    # Graphs at every T: the table's numbers are graph replays, and the eager LoRA call issues
    # more launches than the base one (the graph time shows how much of a gap is host time).
    row["ms_graph"] = bench_graph(ours) if ok else ""
    row["ref_ms"] = bench(lambda: experts_reference(*ref_args, **vkw)) if time_reference else ""
    t = row["ms"] * 1e-3
    row["hbm_pct"] = 100 * touched_weight_bytes(inp) / t / roof["hbm_bytes_per_s"]
    row["bf16_peak_pct"] = 100 * flops(inp) / t / roof["bf16_flops"]
    row.update(roofline.floors(inp, roof))
    best = row["ms_graph"] if row["ms_graph"] != "" else row["ms"]
    row["roofline_pct"] = 100 * row["roofline_ms"] / best if ok else ""
    return row, inp


def _int_list(v: str) -> list[int]:
    try:
        return [int(t) for t in v.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers joined by commas, got {v!r}")


def _fmt(v, digits=4):
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


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
    ap.add_argument("--tokens", type=_int_list, default=None, metavar="T,T,...",
                    help="keep the cases of these token counts only (e.g. 64,256,1024)")
    ap.add_argument("--models", type=lambda v: v.split(","), default=None,
                    metavar="NAME,...", help="keep the cases of these models only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cases = [] if args.families_only else registry(args.quick)
    if args.families or args.families_only:
        cases += family_registry(args.quick)
    cases = [c for c in cases if (args.tokens is None or c.T in args.tokens)
             and (args.models is None or c.model in args.models)]
    if not cases:
        print("bench_moe_lora: --tokens / --models leave no case; the cases' T are "
              f"{T_ALL} and their models {sorted({c.model for c in registry(False)})}",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe_lora needs a CUDA GPU (run it through the device tool)")
    os.makedirs(args.out, exist_ok=True)
    roof = measure_roofline()
    meta = {**env_columns(), **roof}
    log.info("roofline measured in this run: HBM copy %.2f TB/s, bf16 GEMM %.0f TFLOP/s",
             roof["hbm_bytes_per_s"] / 1e12, roof["bf16_flops"] / 1e12)
    rows, base_ms, stage_rows = peers.rows(), {}, []
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
            if row["ms_graph"] != "" and base_ms[key][1] != "":
                row["vs_base_graph"] = row["ms_graph"] / base_ms[key][1]
                row["base_ms_graph"] = base_ms[key][1]
                if case.adapters:
                    extra = row["ms_graph"] - base_ms[key][1]
                    row["lora_extra_ms"] = extra
                    row["lora_extra_pct_of_base"] = 100 * extra / base_ms[key][1]
                    if row["adapter_floor_ms"]:
                        row["extra_over_floor"] = extra / row["adapter_floor_ms"]
        peer = peers.faster_peer(case.model, case.T, lora=case.adapters > 0)
        if peer is not None and row["ms_graph"] != "" and (
                case.adapters == 0 or (case.adapters == 8 and case.rank == 16
                                       and case.share == 1.0)):
            row["vs_faster_peer"] = row["ms_graph"] / peer
        row["target"], row["target_met"] = targets.judge(row, _touches_every_expert(inp))
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
        log.info("%-44s ok=%s graph %s ms, %s%% of roofline, %s, target %s: %s", case.name,
                 row["ok"], _fmt(row["ms_graph"]), _fmt(row.get("roofline_pct"), 1),
                 row["config_source"], row["target"] or "-", row["target_met"])
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
