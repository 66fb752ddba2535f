"""Grouped-GEMM kernels and the fused layer (Triton interpreter) against their references.

fp32 and fp16 only: bf16 ``tl.dot`` is wrong under the interpreter (docs/kernels.md); bf16 runs in
tests/gpu. Tolerances travel with the dtype: fp32 differs from the reference by summation
order only; fp16 stores ``h`` and the per-pair outputs in fp16 (about 1e-3 relative).
"""

import dataclasses

import pytest
import torch
import triton
import triton.language as tl

from moelora_dist.kernels.align.ops import align_items
from moelora_dist.kernels.moe_gemm import naive, ops
from moelora_dist.kernels.moe_gemm.kernel_common import _tile_of
from moelora_dist.kernels.moe_lora.configs import MoEConfig
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
from moelora_dist.moe.experts import pick_backend, run_experts
from moelora_dist.testing.kernel_cases import CASES, make_case
from tests.conftest import effective_slots

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}
# Small tiles keep the interpreter fast and make several blocks per expert.
SMALL = MoEConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1,
                  lora_block_m=16, down_block_n=16, shrink_block_k=16)
# The one-slot-at-a-time expand loop (pick_config's choice for large tiles) next to the run
# loop, so every case runs both expand loops.
SMALL_SLOT_LOOP = dataclasses.replace(SMALL, run_loop=False)


pytestmark = pytest.mark.usefixtures("poisoned_allocations")




def _close(got, want, dtype):
    assert not torch.isnan(got).any(), "kernel left NaN (unwritten or read poisoned memory)"
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("case", list(CASES))
def test_stages_match_reference(case):
    """Each stage on the same alignment as its reference; rows a stage promises are equal."""
    c = make_case(case, T=20, E=4, K=2, R=16)
    x, lora, K = c["x_TH"], c["lora"], 2
    ts, en = c["token_slot_T"], c["slot_enabled_S"]
    base = align_items(c["topk_ids_TK"], ts, en, lora.slot_rank, None, num_experts=4,
                       block_m=16, mode="base", sort_by_slot=True)
    la = align_items(c["topk_ids_TK"], ts, en, lora.slot_rank, lora.gate_up_a_shared,
                     num_experts=4, block_m=16, mode="lora")
    tiles = dict(block_k=16)
    sh = ops.lora_shrink(x, lora, la, K, **tiles)
    sh_ref = naive.lora_shrink(x, lora, la, K)
    written = ~torch.isnan(sh_ref[:, 0])
    # lora_shrink returns its partial sums ([P, N, 2BR]; P = 1 unless split over H)
    torch.testing.assert_close(sh.sum(0)[written], sh_ref[written], atol=1e-4, rtol=1e-4)

    gtiles = dict(block_n=16, block_k=16, num_stages=1)
    h = ops.gate_up(x, c["w_gate_up_EXH"], base, K, ts, en, lora, sh, **gtiles)
    h_ref = naive.gate_up(x, c["w_gate_up_EXH"], base, K, ts, en, lora, sh_ref)
    rows = ~torch.isnan(h_ref[:, 0])
    assert int(rows.sum()) == int((c["topk_ids_TK"] >= 0).sum())
    torch.testing.assert_close(h[rows], h_ref[rows], atol=1e-4, rtol=1e-4)
    h2 = ops.gate_up(x, c["w_gate_up_EXH"], base, K, ts, en, lora, sh, **gtiles, run_loop=False)
    torch.testing.assert_close(h2[rows], h[rows], atol=1e-5, rtol=1e-5)
    # h A_down^T from the stored h, only for rows with a slot: one slot at a time, 4 runs, and
    # the I axis split (partials; their sum is the shrink): split_k=3 of I=24 in K tiles of 16
    # gives 2 programs.
    dsh = ops.down_shrink(h, lora, base, K, ts, en, block_k=16)
    dsh_ref = naive.down_shrink(h, lora, base, K, ts, en)
    lora_rows = ~torch.isnan(dsh_ref[:, 0])
    assert dsh.shape[0] == 1
    torch.testing.assert_close(dsh[0][lora_rows], dsh_ref[lora_rows], atol=1e-4, rtol=1e-4)
    dsh4 = ops.down_shrink(h, lora, base, K, ts, en, block_k=16, lora_runs=4)
    torch.testing.assert_close(dsh4[0][lora_rows], dsh_ref[lora_rows], atol=1e-4, rtol=1e-4)
    for runs in (None, 4):
        split = ops.down_shrink(h, lora, base, K, ts, en, block_k=16, lora_runs=runs,
                                split_k=3)
        assert split.shape[0] == 2
        torch.testing.assert_close(split.sum(0)[lora_rows], dsh_ref[lora_rows], atol=1e-4,
                                   rtol=1e-4)

    out = ops.down(h, c["w_down_EHI"], c["topk_weights_TK"], base, K, ts, en, lora, dsh,
                   **gtiles)
    out_ref = naive.down(h, c["w_down_EHI"], c["topk_weights_TK"], base, K, ts, en, lora, dsh)
    torch.testing.assert_close(out[rows], out_ref[rows], atol=1e-4, rtol=1e-4)
    # Both down expand loops, the first LoRA tiles loaded before the K loop and after it.
    for run_loop in (True, False):
        for prefetch in (True, False):
            o2 = ops.down(h, c["w_down_EHI"], c["topk_weights_TK"], base, K, ts, en, lora,
                          split, **gtiles, run_loop=run_loop, prefetch=prefetch)
            torch.testing.assert_close(o2[rows], out_ref[rows], atol=1e-4, rtol=1e-4)

    y = ops.topk_sum(out, c["topk_ids_TK"], 4)
    torch.testing.assert_close(y, naive.topk_sum(out, c["topk_ids_TK"], 4))


@pytest.mark.parametrize("run_loop", [True, False], ids=["run_loop", "slot_loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_moe_lora_matches_experts_reference(case, dtype, run_loop):
    c = make_case(case, T=20, E=4, K=2, R=16, dtype=dtype)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], "silu", c["slot_enabled_S"],
                         config=SMALL if run_loop else SMALL_SLOT_LOOP)
    want = experts_reference(*args, effective_slots(c), c["lora"])
    _close(got, want, dtype)
    if case == "all_invalid":
        assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("lora_runs,ds_runs,run_loop", [
    (1, 0, True), (2, 1, True), (8, 2, True), (1, 8, True), (1, 4, False)],
    ids=["runs1_ds_per_slot", "runs2_ds1", "runs8_ds2", "runs1_ds8", "slot_loop_ds4"])
def test_stacked_expand_matches_reference_for_any_runs_per_dot(lora_runs, ds_runs, run_loop):
    """A block of ~10 rows holds up to 7 slot runs: 1 and 2 runs per dot loop over chunks,
    8 takes them in one dot with empty bands (slots of rank 4, 8, 16 and shared factors).
    ``ds_runs`` does the same for the down shrink (0: its one-slot-at-a-time kernel)."""
    c = make_case("many_slots", T=20, E=4, K=2)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], "silu", c["slot_enabled_S"],
                         config=dataclasses.replace(SMALL, lora_runs=lora_runs,
                                                    down_shrink_runs=ds_runs,
                                                    run_loop=run_loop))
    _close(got, experts_reference(*args, effective_slots(c), c["lora"]), torch.float32)


def test_expand_does_not_rely_on_rows_sorted_by_slot():
    """With a base alignment not sorted by slot, a slot appears in several runs of a block:
    the result must not change (only the speed depends on the sort)."""
    c = make_case("many_slots", T=20, E=4, K=2)
    x, lora, K = c["x_TH"], c["lora"], 2
    ts, en = c["token_slot_T"], c["slot_enabled_S"]
    al = align_items(c["topk_ids_TK"], None, None, None, None, num_experts=4, block_m=16)
    la = align_items(c["topk_ids_TK"], ts, en, lora.slot_rank, lora.gate_up_a_shared,
                     num_experts=4, block_m=16, mode="lora")
    sh = ops.lora_shrink(x, lora, la, K, block_k=16)
    tiles = dict(block_n=16, block_k=16, num_stages=1, lora_runs=2)
    h = ops.gate_up(x, c["w_gate_up_EXH"], al, K, ts, en, lora, sh, **tiles)
    h_ref = naive.gate_up(x, c["w_gate_up_EXH"], al, K, ts, en, lora, sh)
    rows = ~torch.isnan(h_ref[:, 0])
    torch.testing.assert_close(h[rows], h_ref[rows], atol=1e-4, rtol=1e-4)
    dsh = ops.down_shrink(h, lora, al, K, ts, en, block_k=16)
    dsh_ref = naive.down_shrink(h, lora, al, K, ts, en)
    lora_rows = ~torch.isnan(dsh_ref[:, 0])
    dsh2 = ops.down_shrink(h, lora, al, K, ts, en, block_k=16, lora_runs=2)
    torch.testing.assert_close(dsh2[0][lora_rows], dsh_ref[lora_rows], atol=1e-4, rtol=1e-4)
    out = ops.down(h, c["w_down_EHI"], c["topk_weights_TK"], al, K, ts, en, lora, dsh, **tiles)
    out_ref = naive.down(h, c["w_down_EHI"], c["topk_weights_TK"], al, K, ts, en, lora, dsh)
    torch.testing.assert_close(out[rows], out_ref[rows], atol=1e-4, rtol=1e-4)


def test_lora_runs_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        ops.num_runs(3)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_base_only_and_activation(activation):
    c = make_case("mixed", T=20, E=4, K=2)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    got = fused_moe_lora(*args, None, None, activation, config=SMALL)
    _close(got, experts_reference(*args, activation=activation), torch.float32)


def test_lora_delta_really_applied_and_disabled_slot_ignored():
    """Guards against a kernel that silently drops the delta: with vs without LoRA differ,
    and a disabled slot's tokens equal the base output exactly as the reference says."""
    c = make_case("mixed", T=20, E=4, K=2)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    with_lora = fused_moe_lora(*args, c["token_slot_T"], c["lora"], "silu",
                               c["slot_enabled_S"], config=SMALL)
    base = fused_moe_lora(*args, config=SMALL)
    eff = effective_slots(c)
    has = (eff >= 0) & (c["topk_ids_TK"] >= 0).any(1)
    assert has.any() and (c["token_slot_T"] == 3).any()
    assert (with_lora[has] - base[has]).abs().amax() > 1e-2
    torch.testing.assert_close(with_lora[eff < 0], base[eff < 0], atol=1e-5, rtol=1e-5)


def test_run_experts_backend_is_an_argument():
    """The backend is chosen by the caller (the layer, once at build), never by the
    environment: the Triton path runs on CPU tensors under the interpreter when asked."""
    c = make_case("mixed", T=20, E=4, K=2)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"], effective_slots(c), c["lora"])
    want = experts_reference(*args)
    for backend in ("triton", "torch"):
        got = run_experts(backend, *args, "silu", c["slot_enabled_S"], None)
        _close(got, want, torch.float32)
    with pytest.raises(ValueError, match="unknown expert backend"):
        pick_backend(c["x_TH"].device, "cuda")


def test_num_lora_tokens_zero_skips_lora():
    """The batch info's host count 0 means base only, whatever the buffers hold."""
    c = make_case("mixed", T=20, E=4, K=2)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], "silu", c["slot_enabled_S"],
                         config=SMALL, num_lora_tokens=0)
    _close(got, experts_reference(*args), torch.float32)


def test_bad_inputs_are_named():
    c = make_case("mixed", T=8, E=4, K=2)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"])
    with pytest.raises(ValueError, match="int32"):
        fused_moe_lora(*args, c["topk_ids_TK"].long())
    with pytest.raises(ValueError, match="token_slot_T"):
        fused_moe_lora(*args, c["topk_ids_TK"], None, c["lora"])
    with pytest.raises(ValueError, match="w_down"):
        fused_moe_lora(c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"][:, :4],
                       c["topk_weights_TK"], c["topk_ids_TK"])


@pytest.mark.parametrize("shape", [
    dict(R=32, H=32), dict(R=64, H=32),  # BLOCK_R 32 and 64 (ranks R, R/2, R)
    dict(R=16, H=40),                    # H % BLOCK_K != 0 (block_k 16): a masked K tail
    dict(R=16, E=4, K=4),                # K == E: every token routes to every expert
    dict(R=16, E=1, K=1),                # one local expert
], ids=["rank32", "rank64", "H_not_multiple_of_block_k", "K_equals_E", "one_local_expert"])
@pytest.mark.parametrize("run_loop", [True, False], ids=["run_loop", "slot_loop"])
def test_more_shapes_match_reference(shape, run_loop):
    kw = dict(T=12, E=4, K=2, I=24, H=32)
    kw.update(shape)
    c = make_case("mixed", **kw)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], "silu", c["slot_enabled_S"],
                         config=SMALL if run_loop else SMALL_SLOT_LOOP)
    _close(got, experts_reference(*args, effective_slots(c), c["lora"]), torch.float32)


def test_expert_ids_past_the_local_experts_are_skipped():
    """An id >= E_l (an expert of another rank not localized, or garbage) is never an index:
    it contributes nothing, as -1 does, in the kernels and in the reference."""
    c = make_case("mixed", T=16, E=4, K=2)
    ids = c["topk_ids_TK"].clone()
    ids[::3, 0] = 4
    ids[1::4, 1] = 7
    sentinel = torch.where(ids >= 4, -1, ids)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"])
    got = fused_moe_lora(*args, ids, c["token_slot_T"], c["lora"], "silu", c["slot_enabled_S"],
                         config=SMALL)
    want = fused_moe_lora(*args, sentinel, c["token_slot_T"], c["lora"], "silu",
                          c["slot_enabled_S"], config=SMALL)
    _close(got, want, torch.float32)
    _close(experts_reference(*args, ids, effective_slots(c), c["lora"]),
           experts_reference(*args, sentinel, effective_slots(c), c["lora"]), torch.float32)


@triton.jit
def _tile_order_kernel(out_ptr, num_n, group_m):
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _tile_of(pid, num_n, group_m)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize("group_m", [1, 2, 3, 5, 64])
def test_tile_order_puts_row_blocks_of_a_group_side_by_side(group_m):
    """Every (row block, column tile) exactly once; inside a group of ``group_m`` row blocks
    the row block varies fastest (the last group may be shorter); group 1 is row-major."""
    num_m, num_n = 5, 3
    out = torch.full((num_m * num_n, 2), -1, dtype=torch.int64)
    _tile_order_kernel[(num_m * num_n,)](out, num_n, group_m)
    want = []
    for first in range(0, num_m, group_m):
        size = min(group_m, num_m - first)
        want += [(first + m, n) for n in range(num_n) for m in range(size)]
    assert [tuple(r) for r in out.tolist()] == want
    assert len(set(want)) == num_m * num_n


@pytest.mark.parametrize("fused", [False, True], ids=["separate_shrink", "fused_shrink"])
@pytest.mark.parametrize("case", ["mixed", "many_slots", "empty_expert"])
def test_program_order_does_not_change_the_result(case, fused):
    """``group_m`` reorders gate_up's and down's programs only: base and LoRA outputs are the
    same bits for every value (experts with two and three 16-row blocks at T=40, K=2, E=4)."""
    c = make_case(case, T=40, E=4, K=2, R=16)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    cfg = dataclasses.replace(SMALL, fuse_shrink=fused)
    outs = {}
    for g in (1, 2, 3, 64):
        gcfg = dataclasses.replace(cfg, group_m=g)
        outs[g] = (fused_moe_lora(*args, c["token_slot_T"], c["lora"], "silu",
                                  c["slot_enabled_S"], config=gcfg),
                   fused_moe_lora(*args, None, None, config=gcfg))
    want = experts_reference(*args, effective_slots(c), c["lora"])
    _close(outs[1][0], want, torch.float32)
    for g in (2, 3, 64):
        assert torch.equal(outs[g][0], outs[1][0]) and torch.equal(outs[g][1], outs[1][1]), g


def test_group_m_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="group_m"):
        ops.check_group_m(0)
    with pytest.raises(ValueError, match="group_m"):
        MoEConfig(group_m=0).check()
