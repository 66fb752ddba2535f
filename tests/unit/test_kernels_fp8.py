"""Block-FP8 kernels under the Triton interpreter against their references: the dense linear
and the whole local-expert layer (FP8 base GEMMs + the unchanged LoRA path) on the kernel
cases (sentinels, mixed ranks, shared-outer, disabled slots, many slots).

The Triton 3.9 interpreter loads, stores and multiplies e4m3 correctly, but its fp32 -> e4m3
cast is wrong: it rounds half up on the mantissa bits and drops the carry into the exponent
(31.1 -> 16, where the GPU and torch give 32; ~2% of random values). The ``fp8_cast`` fixture
replaces that one conversion in the interpreter with torch's (round to nearest even, as the
GPU's ``cvt.rn.satfinite``: ``moelora_dist/testing/interpreter.py``); the kernels are
unchanged. The GPU tests (tests/gpu) cover the
hardware cast. fp32 / fp16 activations only (bf16 ``tl.dot`` is wrong in the interpreter).

Tolerance: the kernels and the references compute the same quantized products in another
order (fp32); a last-bit difference in an activation's scaled value can flip one e4m3 rounding
(one step, <= 12.5% of that value), which moves an output by far less than 1e-2 here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moelora_dist.kernels.block_fp8 import naive as fp8_naive
from moelora_dist.kernels.block_fp8 import ops as fp8_ops
from moelora_dist.kernels.moe_lora.configs import MoEConfig
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight
from moelora_dist.models.fp8_weights import reblock_rows
from moelora_dist.testing.kernel_cases import CASES, make_case
from tests.conftest import effective_slots

SMALL = MoEConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1,
                  lora_block_m=16, down_block_n=16, shrink_block_k=16)


@pytest.fixture(autouse=True)
def fp8_cast(e4m3_cast):
    """Every test here runs with the interpreter's e4m3 cast fixed (tests/conftest.py)."""


def test_interpreter_cast_is_patched_to_round_to_nearest():
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.float8e4nv))

    x = torch.tensor([31.1, 7.87, -1.97, 0.3, 448.0, 17.0, 19.0, 0.0])
    y = torch.empty(8, dtype=torch.float8_e4m3fn)
    cast[(1,)](x, y, N=8)
    assert torch.equal(y.float(), x.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,N,K,bias", [(5, 200, 300, True), (1, 64, 128, False),
                                        (33, 136, 256, False)], ids=str)
def test_block_fp8_linear_matches_reference(T, N, K, bias, dtype):
    g = torch.Generator().manual_seed(0)
    w = fp8_naive.quantize_weight(torch.randn(N, K, generator=g) * K ** -0.5)
    x = (torch.randn(T, K, generator=g) * 3).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    got = fp8_ops.block_fp8_linear(x, w, b, block_n=32)
    want = fp8_naive.block_fp8_linear(x, w, b)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_block_fp8_linear_reads_reblocked_rows():
    """Rows cut at 24 and 224 of a 128-blocked weight: scale rows re-blocked to 8 rows."""
    g = torch.Generator().manual_seed(1)
    full = fp8_naive.quantize_weight(torch.randn(320, 256, generator=g))
    pieces = [(24, 48), (224, 248)]
    s, bn = reblock_rows([(a, full.scale_inv[a // 128:-(-b // 128)]) for a, b in pieces],
                         [b - a for a, b in pieces])
    w = BlockFP8Weight(torch.cat([full.weight[a:b] for a, b in pieces]), s, bn)
    x = torch.randn(7, 256, generator=g)
    torch.testing.assert_close(fp8_ops.block_fp8_linear(x, w, block_n=16),
                               fp8_naive.block_fp8_linear(x, w), atol=1e-2, rtol=1e-2)


def _fp8_experts(c, reblocked: bool):
    gu, d = c["w_gate_up_EXH"], c["w_down_EHI"]
    if not reblocked:  # fused tensor: blocks straddle the gate/up border (block_n 128)
        return fp8_naive.quantize_weight(gu), fp8_naive.quantize_weight(d)
    I = gu.shape[1] // 2  # gate and up quantized apart, re-blocked on concatenation
    parts = []
    for e in range(gu.shape[0]):
        g_, u_ = fp8_naive.quantize_weight(gu[e, :I]), fp8_naive.quantize_weight(gu[e, I:])
        s, bn = reblock_rows([(0, g_.scale_inv), (0, u_.scale_inv)], [I, I])
        parts.append((torch.cat([g_.weight, u_.weight]), s, bn))
    w_gu = BlockFP8Weight(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]),
                          parts[0][2])
    return w_gu, fp8_naive.quantize_weight(d)


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("reblocked", [False, True], ids=["fused_blocks", "reblocked"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_moe_lora_fp8_matches_reference(case, reblocked):
    c = make_case(case, T=20, H=160, I=24, E=4, K=2, R=16)
    w_gu, w_d = _fp8_experts(c, reblocked)
    w_gu.check(), w_d.check()
    args = (c["x_TH"], w_gu, w_d, c["topk_weights_TK"], c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], slot_enabled_S=c["slot_enabled_S"],
                         config=SMALL)
    want = experts_reference(*args, effective_slots(c), c["lora"])
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    if case == "all_invalid":
        assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("switches", [
    dict(shrink_split_k=2), dict(fuse_down_shrink=True),
    dict(fuse_shrink=True, fuse_down_shrink=True),  # FP8 takes the separate shrink
    dict(group_m=3), dict(group_m=64, fp8_prequant=False),  # program orders, both inputs
], ids=["split_shrink", "fused_down_shrink", "fused_both", "group3", "group64_inloop"])
def test_lora_variants_on_fp8_experts(switches):
    """The MoEConfig switches the tuner measures keep the LoRA path bf16/fp32 on FP8 experts."""
    c = make_case("many_slots", T=20, H=160, I=24, E=4, K=2, R=16)
    w_gu, w_d = _fp8_experts(c, False)
    args = (c["x_TH"], w_gu, w_d, c["topk_weights_TK"], c["topk_ids_TK"])
    cfg = dataclasses.replace(SMALL, **switches).check()
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], slot_enabled_S=c["slot_enabled_S"],
                         config=cfg)
    want = experts_reference(*args, effective_slots(c), c["lora"])
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("T,K", [(1, 128), (37, 300), (70, 256)], ids=str)
def test_quantize_act_kernel_equals_the_reference_bit_for_bit(T, K):
    """The pre-quantizing kernel gives the reference's e4m3 values and scales exactly (the
    GEMMs then read the same numbers whether they quantize in the K loop or not)."""
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, K, generator=g) * torch.logspace(-3, 2, K)  # groups of unequal scale
    x[0, :128] = 0.0  # an all-zero group: the amax floor, not a division by zero
    q, s = fp8_ops.quantize_act(x)
    q_ref, s_ref = fp8_naive.quantize_act(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (T, -(-K // 128))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s, s_ref)


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("prequant", [False, True], ids=["in_loop", "prequant"])
@pytest.mark.parametrize("case", ["many_slots", "mixed", "empty_expert"])
def test_fp8_activation_quantization_paths_agree(case, prequant):
    """``fp8_prequant`` (x and h quantized by their own kernel) and the in-loop quantization
    both match the reference, base and LoRA, at an H and I that are not multiples of 128."""
    c = make_case(case, T=20, H=160, I=24, E=4, K=2, R=16)
    w_gu, w_d = _fp8_experts(c, False)
    args = (c["x_TH"], w_gu, w_d, c["topk_weights_TK"], c["topk_ids_TK"])
    cfg = dataclasses.replace(SMALL, fp8_prequant=prequant).check()
    for lora in (None, c["lora"]):
        got = fused_moe_lora(*args, c["token_slot_T"], lora, slot_enabled_S=c["slot_enabled_S"],
                             config=cfg)
        want = experts_reference(*args, effective_slots(c) if lora is not None else None, lora)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_prequantized_input_without_fp8_weights_is_refused():
    from moelora_dist.kernels.moe_gemm import ops as gemm_ops

    c = make_case("many_slots", T=4, H=160, I=24, E=4, K=2, R=16)
    q, s = fp8_ops.quantize_act(c["x_TH"])
    with pytest.raises(ValueError, match="pre-quantized activations need FP8 weights"):
        gemm_ops._check_prequant(q, s, c["w_gate_up_EXH"])
    w_gu, _ = _fp8_experts(c, False)
    with pytest.raises(ValueError, match=r"scales"):
        gemm_ops._check_prequant(q, s[:, :1], w_gu)


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("prequant", [False, True], ids=["in_loop", "prequant"])
def test_per_tile_weight_scales_equal_per_column_scales(prequant, monkeypatch):
    """Where every n-tile lies inside one scale row (I = 144: tiles of 16, gate and up rows
    across three 128-row scale blocks, H and I not multiples of 128), the kernels load one
    scalar scale per K step; the output equals the per-column path's bit for bit, and the
    reference."""
    from moelora_dist.kernels.moe_gemm import ops as gemm_ops

    c = make_case("many_slots", T=20, H=160, I=144, E=4, K=2, R=16)
    w_gu, w_d = _fp8_experts(c, False)
    assert gemm_ops._scale_per_tile(w_gu, 16, (0, 144)) and gemm_ops._scale_per_tile(w_d, 16, (0,))
    args = (c["x_TH"], w_gu, w_d, c["topk_weights_TK"], c["topk_ids_TK"])
    cfg = dataclasses.replace(SMALL, fp8_prequant=prequant).check()
    run = lambda: fused_moe_lora(*args, c["token_slot_T"], c["lora"],  # noqa: E731
                                 slot_enabled_S=c["slot_enabled_S"], config=cfg)
    got = run()
    monkeypatch.setattr(gemm_ops, "_scale_per_tile", lambda *a: False)
    assert torch.equal(got, run())
    want = experts_reference(*args, effective_slots(c), c["lora"])
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("split_k", [2, 3, 5, 64])
@pytest.mark.parametrize("T,N,K,bias", [(5, 200, 640, True), (33, 136, 512, False)], ids=str)
def test_block_fp8_linear_split_k_matches_reference(T, N, K, bias, split_k, monkeypatch):
    """K split over programs (fp32 partials summed in split order by a second launch): the
    reference's result, with a ragged last split (640 = 5 steps of 128 in 2 or 3 splits) and
    more splits asked than there are steps (64: one step each); the same bits run to run."""
    sums = []
    kernel = fp8_ops._split_sum_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                sums.append(args[4])  # the number of partials
                return kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(fp8_ops, "_split_sum_kernel", Spy())
    g = torch.Generator().manual_seed(2)
    w = fp8_naive.quantize_weight(torch.randn(N, K, generator=g) * K ** -0.5)
    x = (torch.randn(T, K, generator=g) * 3).to(torch.float32)
    b = torch.randn(N, generator=g) if bias else None
    got = fp8_ops.block_fp8_linear(x, w, b, block_n=32, split_k=split_k)
    steps = K // 128
    assert sums == [-(-steps // -(-steps // split_k))]  # the partials the split made
    torch.testing.assert_close(got, fp8_naive.block_fp8_linear(x, w, b), atol=1e-3, rtol=1e-3)
    assert torch.equal(got, fp8_ops.block_fp8_linear(x, w, b, block_n=32, split_k=split_k))


def test_block_fp8_linear_splits_decode_sizes_only():
    """Qwen3-30B-A3B's projections on 132 SMs: split at 1 and 64 tokens (too few tiles to fill
    the GPU), not at 4096; never below two 128-column steps per split."""
    sf = fp8_ops.split_k_for
    assert sf(1, 5120, 2048, 16, 64, 132) == 4  # q/k/v: 80 tiles
    assert sf(1, 2048, 4096, 16, 64, 132) == 9  # o: 32 tiles
    assert sf(64, 2048, 4096, 32, 64, 132) == 5
    assert sf(4096, 5120, 2048, 64, 64, 132) == 1
    assert sf(1, 64, 256, 16, 64, 132) == 1  # two steps: no split
    assert not fp8_ops.AUTO_SPLIT  # off until measured on a GPU (docs/fp8.md)
    with pytest.raises(ValueError, match="split_k"):
        fp8_ops.block_fp8_linear(torch.zeros(1, 128), fp8_naive.quantize_weight(
            torch.zeros(64, 128)), split_k=0)


def test_block_fp8_linear_auto_split_follows_split_k_for(monkeypatch):
    """With AUTO_SPLIT on, a launch without ``split_k`` splits as ``split_k_for`` says (one
    64-column tile of K 1024 on 132 SMs: 4 splits of 2 steps) and still matches the reference."""
    seen = []
    kernel = fp8_ops._split_sum_kernel

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **kw: (seen.append(a[4]), kernel[grid](*a, **kw))[1]

    monkeypatch.setattr(fp8_ops, "_split_sum_kernel", Spy())
    monkeypatch.setattr(fp8_ops, "AUTO_SPLIT", True)
    g = torch.Generator().manual_seed(3)
    w = fp8_naive.quantize_weight(torch.randn(64, 1024, generator=g) * 1024 ** -0.5)
    x = torch.randn(1, 1024, generator=g)
    got = fp8_ops.block_fp8_linear(x, w)
    assert seen == [4]
    torch.testing.assert_close(got, fp8_naive.block_fp8_linear(x, w), atol=1e-3, rtol=1e-3)
