"""Compile the kernels that have not run on a GPU yet (and the default-path kernels whose code
moved since the last GPU run) for sm_90 (H100 / H200), on any machine:
Triton's own compiler and ptxas, launched through the real host glue on ``meta`` tensors (the
harness of :mod:`benchmarks.kernels.ir_report`), so the signature, the integer specialization
and the constexprs are the ones a launch on the device compiles.

    PYTHONPATH=$PWD python -m benchmarks.kernels.compile_check [--only NAME ...]

The interpreter checks a kernel's semantics, not its code generation: a kernel that passed it
once failed to compile on the GPU (the gate_up prefetch, S4). One line per case, exit 1 if
any fails. Needs Triton's NVIDIA backend (ptxas ships in the wheel) and no TRITON_INTERPRET.
The Triton here may be newer than the device's (3.6 there): a pass is evidence, not proof.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

META = dict(device="meta")
BF16 = torch.bfloat16


def _compiled(kernels, call) -> list:
    from triton.backends.compiler import GPUTarget

    from benchmarks.kernels.ir_report import _compile_only

    target = GPUTarget("cuda", 90, 32)
    got: list = []

    def run(rest):
        if not rest:
            call()
            return
        with _compile_only(rest[0], target, got):
            run(rest[1:])

    run(list(kernels))
    return got


def _token_lora(T: int, outs: list[int], n_splits: int = 4):
    from moelora_dist.kernels.dense_lora.ops import TokenLoRA

    S, R = 8, 16
    return TokenLoRA(torch.empty(n_splits, len(outs), T, R, dtype=torch.float32, **META),
                     [torch.empty(S, o, R, dtype=BF16, **META) for o in outs],
                     torch.empty(T, dtype=torch.int32, **META),
                     torch.empty(S, dtype=torch.bool, **META),
                     torch.empty(S, dtype=torch.int32, **META))


def block_fp8_split(T: int, split: int) -> list:
    """Qwen3-30B-A3B's fused q/k/v (N 5120, K 2048) with ``split`` K splits."""
    from benchmarks.kernels.ir_report import _fp8_weight
    from moelora_dist.kernels.block_fp8 import ops
    from moelora_dist.kernels.block_fp8.kernel import _block_fp8_linear_kernel, _split_sum_kernel

    x = torch.empty(T, 2048, dtype=BF16, **META)
    return _compiled([_block_fp8_linear_kernel, _split_sum_kernel],
                     lambda: ops.block_fp8_linear(x, _fp8_weight(5120, 2048), split_k=split))


def page_write_lora(head_norm: bool) -> list:
    """The page write with the q/k/v expand at Qwen3-30B-A3B's heads (32 / 4 of 128)."""
    from moelora_dist.kernels.paged_attention import ops
    from moelora_dist.kernels.paged_attention.kernel import _rope_write_lora_kernel

    T, Nq, Nk, D = 64, 32, 4, 128
    qkv = torch.empty(T, (Nq + 2 * Nk) * D, dtype=BF16, **META)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([Nq * D, Nk * D, Nk * D], dim=1))
    pages = torch.empty(64, 16, Nk, D, dtype=BF16, **META)
    cos = torch.empty(4096, D // 2, dtype=torch.float32, **META)
    pos = torch.empty(T, dtype=torch.long, **META)
    w = torch.empty(D, dtype=BF16, **META) if head_norm else None
    return _compiled([_rope_write_lora_kernel], lambda: ops.rope_write(
        q, k, v, pos, cos, cos, pos, pages, pages, w, w, 1e-6,
        lora=_token_lora(T, [Nq * D, Nk * D, Nk * D])))


def norm_lora() -> list:
    """The residual add + norm with o's expand at hidden 2048."""
    from moelora_dist.kernels.norm import ops
    from moelora_dist.kernels.norm.kernel import _add_rms_norm_lora_kernel

    T, H = 64, 2048
    h = torch.empty(T, H, dtype=BF16, **META)
    return _compiled([_add_rms_norm_lora_kernel], lambda: ops.add_rms_norm(
        h, torch.empty(T, H, dtype=BF16, **META), torch.empty(H, dtype=BF16, **META), 1e-6,
        lora=_token_lora(T, [H])))


def norm_topk() -> list:
    """The residual add + norm that sums a MoE layer's top-8 pair rows (hidden 2048)."""
    from moelora_dist.kernels.moe_gemm.pairs import PairOutputs
    from moelora_dist.kernels.norm import ops
    from moelora_dist.kernels.norm.kernel import _add_topk_rms_norm_kernel

    T, K, H = 64, 8, 2048
    h = torch.empty(T, H, dtype=BF16, **META)
    pairs = PairOutputs(torch.empty(T * K, H, dtype=BF16, **META),
                        torch.empty(T, K, dtype=torch.int32, **META), 128)
    w = torch.empty(H, dtype=BF16, **META)

    def run():
        ops.add_topk_rms_norm(h, pairs, w, 1e-6)
        ops.add_topk_rms_norm(h, pairs._replace(plus_TH=torch.empty(T, H, dtype=BF16, **META)),
                              w, 1e-6)  # with shared experts

    return _compiled([_add_topk_rms_norm_kernel], run)


def refactored_defaults() -> list:
    """The default-path kernels whose code S10 moved into shared helpers (the plain page
    write, the plain norm, ``topk_sum``): they run on every step."""
    from moelora_dist.kernels.moe_gemm import ops as gemm_ops
    from moelora_dist.kernels.moe_gemm.kernel_down import _topk_sum_kernel
    from moelora_dist.kernels.norm import ops as norm_ops
    from moelora_dist.kernels.norm.kernel import _add_rms_norm_kernel
    from moelora_dist.kernels.paged_attention import ops as pa_ops
    from moelora_dist.kernels.paged_attention.kernel import _rope_write_kernel

    T, Nq, Nk, D, H, K = 64, 32, 4, 128, 2048, 8
    qkv = torch.empty(T, (Nq + 2 * Nk) * D, dtype=BF16, **META)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([Nq * D, Nk * D, Nk * D], dim=1))
    pages = torch.empty(64, 16, Nk, D, dtype=BF16, **META)
    cos = torch.empty(4096, D // 2, dtype=torch.float32, **META)
    pos = torch.empty(T, dtype=torch.long, **META)
    w = torch.empty(D, dtype=BF16, **META)
    h = torch.empty(T, H, dtype=BF16, **META)
    wh = torch.empty(H, dtype=BF16, **META)

    def run():
        pa_ops.rope_write(q, k, v, pos, cos, cos, pos, pages, pages, w, w, 1e-6)
        pa_ops.rope_write(q, k, v, pos, cos, cos, pos, pages, pages)
        norm_ops.add_rms_norm(h, torch.empty(T, H, dtype=BF16, **META), wh, 1e-6)
        norm_ops.add_rms_norm(h, None, wh, 1e-6)
        gemm_ops.topk_sum(torch.empty(T * K, H, dtype=BF16, **META),
                          torch.empty(T, K, dtype=torch.int32, **META), 128)

    return _compiled([_rope_write_kernel, _add_rms_norm_kernel, _topk_sum_kernel], run)


CASES = {  # name: (what, expected kernel names)
    "block_fp8_split_t1": (lambda: block_fp8_split(1, 4),
                           ["_block_fp8_linear_kernel", "_split_sum_kernel"]),
    "block_fp8_split_t64": (lambda: block_fp8_split(64, 2),
                            ["_block_fp8_linear_kernel", "_split_sum_kernel"]),
    "page_write_lora": (lambda: page_write_lora(False), ["_rope_write_lora_kernel"]),
    "page_write_lora_head_norm": (lambda: page_write_lora(True), ["_rope_write_lora_kernel"]),
    "norm_lora": (norm_lora, ["_add_rms_norm_lora_kernel"]),
    "norm_topk": (norm_topk, ["_add_topk_rms_norm_kernel"] * 2),
    "refactored_defaults": (refactored_defaults, ["_add_rms_norm_kernel"] * 2
                            + ["_rope_write_kernel"] * 2 + ["_topk_sum_kernel"]),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), help="cases (default: all)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: TRITON_INTERPRET is set; unset it (the interpreter compiles "
              "nothing)", file=sys.stderr)
        return 2
    failed = 0
    for name in args.only or list(CASES):
        make, want = CASES[name]
        try:
            got = make()
            names = sorted(c.name for c in got)
            ok = names == sorted(want) and all(c.asm.get("cubin") for c in got)
            print(f"{name}: {'ok' if ok else 'unexpected ' + str(names)} "
                  f"(smem {[c.metadata.shared for c in got]})")
        except Exception:  # noqa: BLE001  one line per case, the traceback below it
            ok = False
            print(f"{name}: FAILED\n{traceback.format_exc()}")
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
