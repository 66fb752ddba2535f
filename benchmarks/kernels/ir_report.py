"""Static IR report of the grouped-GEMM kernels: compile gate_up and down for a GPU target on
any machine (no GPU needed) and print what the code generator made of them.

    PYTHONPATH=$PWD python -m benchmarks.kernels.ir_report --shape qwen3-30b-a3b --fp8 \\
        --block-m 64 --block-n 128 --num-warps 8 --num-stages 3

The kernels are launched through the real launchers (``moe_gemm.ops.gate_up`` / ``down``) on
``meta`` tensors with the kernel's ``run`` replaced by a compile for ``--arch``: the
signature, the integer / alignment specialization and the constexprs are the ones a launch on
the device would compile, without a driver. Per kernel it prints the wgmma instructions of
the PTX (kind and shape), how many sit in the K loop and the ``wgmma.wait_group`` counts
there (``0`` in the loop: every iteration waits for its MMAs before the next ones issue, so
loads and MMAs of two iterations cannot overlap), registers and spills from ``ptxas -v``,
and the shared memory Triton allocates. Static evidence only: it says nothing about time.
``--dump DIR`` keeps the PTX and TTGIR.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.runtime.jit import create_function_from_signature

from moelora_dist.kernels.align.common import Alignment, max_rows
from moelora_dist.kernels.constants import FP8_GROUP
from moelora_dist.kernels.moe_gemm import ops
from moelora_dist.kernels.moe_gemm.kernel_down import _down_kernel
from moelora_dist.kernels.moe_gemm.kernel_gate_up import _gate_up_kernel
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight

SHAPES = {  # H, E_local, K, I (as benchmarks/kernels/bench_fp8.py)
    "qwen3-30b-a3b": (2048, 128, 8, 768),
    "mixtral-8x7b": (4096, 8, 2, 14336),
    "deepseek-v3-routed-ep8": (7168, 32, 8, 2048),
}
META = dict(device="meta")


@contextlib.contextmanager
def _compile_only(kernel, target: GPUTarget, out: list):
    """Within the block, a launch of ``kernel`` compiles it for ``target`` (appended to
    ``out``) instead of running it: the JIT's own binder and argument packing, no driver."""
    backend = triton.compiler.make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)

    def run(*args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", kernel.debug)
        bound, spec, options = binder(*args, **kwargs)
        options, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec,
                                                            options)
        src = ASTSource(kernel, sig, constexprs, attrs)
        out.append(triton.compile(src, target=target, options=options.__dict__))

    kernel.run = run
    try:
        yield
    finally:
        del kernel.run


def _fp8_weight(*shape) -> BlockFP8Weight:
    *lead, n, k = shape
    scales = torch.empty(*lead, triton.cdiv(n, FP8_GROUP), triton.cdiv(k, FP8_GROUP),
                         dtype=torch.float32, **META)
    return BlockFP8Weight(torch.empty(*shape, dtype=torch.float8_e4m3fn, **META), scales)


def _alignment(num_pairs: int, num_experts: int, block_m: int) -> Alignment:
    rows = max_rows(num_pairs, num_experts, block_m)
    i32 = dict(dtype=torch.int32, **META)
    return Alignment(torch.empty(rows, **i32), torch.empty(rows // block_m, **i32),
                     torch.empty(1, **i32), block_m, num_pairs)


def compile_pair(shape: str, tokens: int, fp8: bool, cfg: dict, target: GPUTarget) -> dict:
    """{"gate_up": compiled, "down": compiled} for one shape and tile config, pre-quantized
    FP8 activations when ``fp8`` (the ``fp8_prequant`` path), bf16 otherwise; no LoRA."""
    H, E, K, inter = SHAPES[shape]
    N = tokens * K
    act = torch.float8_e4m3fn if fp8 else torch.bfloat16
    al = _alignment(N, E, cfg["block_m"])
    x = torch.empty(tokens, H, dtype=act, **META)
    h = torch.empty(N, inter, dtype=act, **META)
    if fp8:
        w_gu, w_d = _fp8_weight(E, 2 * inter, H), _fp8_weight(E, H, inter)
        x_scale = torch.empty(tokens, triton.cdiv(H, FP8_GROUP), dtype=torch.float32, **META)
        h_scale = torch.empty(N, triton.cdiv(inter, FP8_GROUP), dtype=torch.float32, **META)
        extra = dict(x_scale=x_scale), dict(h_scale=h_scale)
    else:
        w_gu = torch.empty(E, 2 * inter, H, dtype=act, **META)
        w_d = torch.empty(E, H, inter, dtype=act, **META)
        extra = {}, {}
    topk_w = torch.empty(tokens, K, dtype=torch.float32, **META)
    out: dict = {}
    for name, kernel, call in (
            ("gate_up", _gate_up_kernel, lambda: ops.gate_up(
                x, w_gu, al, K, block_n=cfg["block_n"], block_k=cfg["block_k"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                out_dtype=torch.bfloat16, **extra[0], **cfg.get("gate_up_extra", {}))),
            ("down", _down_kernel, lambda: ops.down(
                h, w_d, topk_w, al, K, block_n=cfg["down_block_n"],
                block_k=cfg["down_block_k"], num_warps=cfg["down_num_warps"],
                num_stages=cfg["down_num_stages"], out_dtype=torch.bfloat16, **extra[1],
                **cfg.get("down_extra", {})))):
        got: list = []
        with _compile_only(kernel, target, got):
            call()
        out[name] = got[0]
    return out


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line of every PTX loop: a label and a later branch back to it."""
    labels = {m.group(1): i for i, ln in enumerate(lines)
              if (m := re.match(r"^\s*(\$L__\w+):", ln))}
    loops = []
    for i, ln in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", ln)
        if m and labels.get(m.group(1), i + 1) < i:
            loops.append((labels[m.group(1)], i))
    return loops


def wgmma_summary(ptx: str) -> dict:
    """wgmma kinds, and for the loop holding the most of them (the K loop): its wgmma count,
    its ``wgmma.wait_group`` pending counts, and the wgmma instructions outside any loop."""
    lines = ptx.splitlines()
    mma = [i for i, ln in enumerate(lines) if "wgmma.mma_async" in ln]
    kinds = sorted({re.search(r"wgmma\.mma_async\S*", lines[i]).group(0).rstrip(",")
                    for i in mma})
    loops = _loops(lines)
    k_loop = max(loops, key=lambda lp: sum(lp[0] <= i <= lp[1] for i in mma), default=None)
    inside = [i for i in mma if k_loop and k_loop[0] <= i <= k_loop[1]]
    waits = []
    if k_loop:
        for ln in lines[k_loop[0]:k_loop[1] + 1]:
            if m := re.search(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ln):
                waits.append(int(m.group(1)))
    return dict(kinds=kinds, in_loop=len(inside), total=len(mma), waits_in_loop=waits,
                wait0_in_loop=0 in waits)


def ptxas_stats(ptx: str, arch: str) -> dict:
    """Registers, spill stores / loads and stack frame from ``ptxas -v`` on the PTX."""
    ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path  # the one Triton assembles with
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([ptxas, "-v", f"-arch={arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    text = res.stderr + res.stdout
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else -1  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), spill_st=num(r"(\d+) bytes spill stores"),
                spill_ld=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"))


def ctas_per_sm(regs: int, smem: int, num_warps: int) -> int:
    """Resident programs per SM of an H100 / H200 (sm_90): 64 K registers (allocated per warp
    in units of 256, i.e. 8 per thread), 228 KiB shared memory with 1 KiB reserved per
    program, 64 warps."""
    by_regs = 65536 // (-(-regs // 8) * 8 * 32 * num_warps)
    by_smem = (228 * 1024) // (smem + 1024)
    return min(by_regs, by_smem, 64 // num_warps)


def report(compiled, arch: str) -> dict:
    """Every static metric of one compiled kernel."""
    row = dict(smem=compiled.metadata.shared, **ptxas_stats(compiled.asm["ptx"], arch))
    row.update(wgmma_summary(compiled.asm["ptx"]))
    row["ctas_per_sm"] = ctas_per_sm(row["regs"], row["smem"], compiled.metadata.num_warps)
    return row


def _line(r: dict) -> str:
    return (f"regs {r['regs']:3d}  spill st/ld {r['spill_st']}/{r['spill_ld']}  stack "
            f"{r['stack']}  smem {r['smem']}  CTAs/SM {r['ctas_per_sm']}  wgmma {r['in_loop']}/"
            f"{r['total']} in K loop, waits {r['waits_in_loop']} (0 in loop: "
            f"{r['wait0_in_loop']})  {', '.join(r['kinds'])}")


def _config(args) -> dict:
    return dict(block_m=args.block_m, block_n=args.block_n, block_k=FP8_GROUP if args.fp8
                else args.block_k, num_warps=args.num_warps, num_stages=args.num_stages,
                down_block_n=args.down_block_n or args.block_n,
                down_block_k=FP8_GROUP if args.fp8 else (args.down_block_k or args.block_k),
                down_num_warps=args.down_num_warps or args.num_warps,
                down_num_stages=args.down_num_stages or args.num_stages)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--fp8", action="store_true",
                   help="FP8 weights, pre-quantized activations (block_k is then 128)")
    p.add_argument("--block-m", type=int, default=64)
    p.add_argument("--block-n", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--num-warps", type=int, default=8)
    p.add_argument("--num-stages", type=int, default=3)
    p.add_argument("--down-block-n", type=int, help="default: --block-n")
    p.add_argument("--down-block-k", type=int, help="default: --block-k")
    p.add_argument("--down-num-warps", type=int, help="default: --num-warps")
    p.add_argument("--down-num-stages", type=int, help="default: --num-stages")
    p.add_argument("--per-column-scales", action="store_true",
                   help="FP8: load the weight scales per column even where one scalar per "
                        "tile would do (the kernels before WS_PER_TILE)")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability")
    p.add_argument("--dump", help="write <kernel>.ptx / .ttgir into this folder")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    sm = f"sm_{args.arch}a" if args.arch >= 90 else f"sm_{args.arch}"
    cfg = _config(args)
    if args.per_column_scales:
        ops._scale_per_tile = lambda *_: False
    print(f"triton {triton.__version__}  {args.shape} T={args.tokens} "
          f"{'fp8' if args.fp8 else 'bf16'}  {cfg}")
    for name, compiled in compile_pair(args.shape, args.tokens, args.fp8, cfg, target).items():
        print(f"{name:8s} {_line(report(compiled, sm))}")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            for ext in ("ptx", "ttgir"):
                with open(os.path.join(args.dump, f"{name}.{ext}"), "w") as f:
                    f.write(compiled.asm[ext])


if __name__ == "__main__":
    main()
