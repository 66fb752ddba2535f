"""Compile the dispatch kernels for an H100/H200 (sm_90) without a GPU: Triton's front end,
its passes and ptxas catch type and layout errors that the interpreter lets through.

    TRITON_INTERPRET= python -m moelora_dist.testing.compile_dispatch     # prints one line each

Run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels). Exit code 1 if any
variant fails to compile; 0 otherwise.
"""

from __future__ import annotations

import sys

VARIANTS = [  # (kernel, x dtype, constexprs)
    ("_dispatch_index_kernel", None, dict(BLOCK_N=2048, BLOCK_K=8)),
    ("_dispatch_pack_kernel", "bf16", dict(HAS_SLOT=True, LIST=False, BYPASS=True, BLOCK_M=8,
                                           BLOCK_W=32, BLOCK_H=1024, BLOCK_P=2)),
    ("_dispatch_pack_kernel", "fp32", dict(HAS_SLOT=False, LIST=True, BYPASS=False, BLOCK_M=8,
                                           BLOCK_W=32, BLOCK_H=1024, BLOCK_P=8)),
    ("_unpack_meta_kernel", None, dict(BLOCK_M=64, BLOCK_K=8)),
    ("_combine_kernel", "bf16", dict(BYPASS=True, HAS_OVF=True, ACC_F64=False, BLOCK_M=8,
                                     BLOCK_H=1024)),
    ("_combine_kernel", "fp64", dict(BYPASS=False, HAS_OVF=False, ACC_F64=True, BLOCK_M=4,
                                     BLOCK_H=1024)),
]


def _signature(fn, dtype: str | None, constexprs: dict) -> dict:
    """Pointer and scalar types by argument name (the kernels' naming convention); kernels
    without an x dtype (``dtype=None``) read int32 everywhere but the fp32 weights."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif dtype and name in ("x_ptr", "xo_ptr", "out_ptr", "y_ptr", "back_ptr", "ovf_ptr"):
            sig[name] = f"*{dtype}"
        elif name == "w_ptr":
            sig[name] = "*fp32"
        elif name == "off_ptr" or (name == "ovf_off_ptr" and constexprs.get("HAS_OVF")):
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        elif name.startswith("stride") or name in ("row_words", "row_elems"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moelora_dist.kernels.dispatch import kernel

    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for name, dtype, consts in VARIANTS:
        fn = getattr(kernel, name)
        try:
            triton.compile(ASTSource(fn=fn, signature=_signature(fn, dtype, consts),
                                     constexprs=consts), target=target)
            print(f"ok   {name} {dtype or ''} {consts}")
        except Exception as exc:  # every variant is tried; the report lists each failure
            failed += 1
            print(f"FAIL {name} {dtype or ''} {consts}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
