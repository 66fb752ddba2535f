"""The LoRA variants behind ``MoEConfig`` switches (Triton interpreter) against the reference.

Every variant the tuner may pick computes the same function as the default pipeline: the
H-split shrink (partials added by the gate_up expand), the down shrink in the gate_up epilogue
(one partial per n-tile), the down shrink split over I, the down expand's first LoRA tiles loaded
after the base K loop instead of before it, the shrink inside the gate_up K loop (with a second pass over K for
blocks with more slot runs than one pass takes), both fused, and the slot loop with the fused
down shrink. Each runs every case of the suite (sentinels, mixed ranks, an empty expert, one
expert, T below the block, no LoRA token, all invalid, many slots with shared-outer factors
and a disabled slot) and the shapes of ranks 32/64/128 and H not a multiple of the K tile.
fp32 (summation order only) and fp16 (``h`` and pair outputs stored in fp16) as in
``test_kernels_moe.py``; bf16 runs on the GPU (tests/gpu).
"""

import dataclasses

import pytest
import torch

from moelora_dist.kernels.align.ops import align_items
from moelora_dist.kernels.moe_gemm import naive, ops
from moelora_dist.kernels.moe_gemm.ops_fused import gate_up_lora
from moelora_dist.kernels.moe_lora.configs import MoEConfig
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
from moelora_dist.testing.kernel_cases import CASES, make_case
from tests.conftest import effective_slots

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}
SMALL = MoEConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1,
                  lora_block_m=16, down_block_n=16, shrink_block_k=16)
rep = dataclasses.replace
VARIANTS = {
    "split_shrink": rep(SMALL, shrink_split_k=2),
    "fused_down_shrink": rep(SMALL, fuse_down_shrink=True),
    # one run per pass: a block with several slots takes the second-pass loop
    "fused_shrink_1run": rep(SMALL, fuse_shrink=True, lora_runs=1),
    "fused_both": rep(SMALL, fuse_shrink=True, fuse_down_shrink=True, lora_runs=2,
                      down_shrink_runs=0),
    "slot_loop_fused_ds_split": rep(SMALL, run_loop=False, fuse_down_shrink=True,
                                    shrink_split_k=2),
    # the down shrink split over I (partials summed by the down expand), with the expands'
    # first LoRA tiles loaded after the base K loop (the default loads them before it)
    "split_down_shrink_late_tiles": rep(SMALL, down_shrink_split_k=2, lora_prefetch=False),
    "slot_loop_split_down_shrink": rep(SMALL, run_loop=False, down_shrink_split_k=2,
                                       lora_runs=1),
}


def _run(c, cfg, **kw):
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], "silu", c["slot_enabled_S"],
                         config=cfg.check(), **kw)
    return got, experts_reference(*args, effective_slots(c), c["lora"])


def _close(got, want, dtype):
    assert not torch.isnan(got).any(), "kernel left NaN (unwritten or read poisoned memory)"
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(CASES))
def test_variant_matches_reference(case, variant):
    c = make_case(case, T=20, E=4, K=2, R=16)
    _close(*_run(c, VARIANTS[variant]), torch.float32)


@pytest.mark.parametrize("variant", ["split_shrink", "fused_both", "slot_loop_fused_ds_split"])
def test_variant_matches_reference_fp16(variant):
    c = make_case("many_slots", T=20, E=4, K=2, R=16, dtype=torch.float16)
    _close(*_run(c, VARIANTS[variant]), torch.float16)


@pytest.mark.parametrize("shape", [
    dict(R=32), dict(R=64), dict(R=128),  # BLOCK_R 32, 64, 128 (slots of rank R, R/2, R)
    dict(R=16, H=40),  # H % BLOCK_K != 0 (block_k 16): masked K tails in every K loop
], ids=["rank32", "rank64", "rank128", "H_not_multiple_of_block_k"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_more_shapes(shape, variant):
    kw = dict(T=12, E=4, K=2, I=24, H=32)
    kw.update(shape)
    c = make_case("mixed", **kw)
    _close(*_run(c, VARIANTS[variant]), torch.float32)


def test_variant_stages_match_their_references():
    """Each fused launch on the alignment of its reference: the H-split shrink's partials sum
    to the shrink; the fused-shrink gate_up gives the h of the reference gate_up; the epilogue
    down shrink's partials sum to the reference down shrink, on every row with a slot."""
    c = make_case("many_slots", T=20, E=4, K=2, R=16, H=40)
    x, lora, K = c["x_TH"], c["lora"], 2
    ts, en = c["token_slot_T"], c["slot_enabled_S"]
    base = align_items(c["topk_ids_TK"], ts, en, lora.slot_rank, None, num_experts=4,
                       block_m=16, mode="base", sort_by_slot=True)
    la = align_items(c["topk_ids_TK"], ts, en, lora.slot_rank, lora.gate_up_a_shared,
                     num_experts=4, block_m=16, mode="lora")
    sh = ops.lora_shrink(x, lora, la, K, block_k=16, split_k=3)
    assert sh.shape[0] == 3  # H = 40 in K tiles of 16: three splits of one tile each
    sh_ref = naive.lora_shrink(x, lora, la, K)
    written = ~torch.isnan(sh_ref[:, 0])
    torch.testing.assert_close(sh.sum(0)[written], sh_ref[written], atol=1e-4, rtol=1e-4)

    tiles = dict(block_n=16, block_k=16, num_stages=1)
    h_ref = naive.gate_up(x, c["w_gate_up_EXH"], base, K, ts, en, lora, sh_ref)
    rows = ~torch.isnan(h_ref[:, 0])
    h_split = ops.gate_up(x, c["w_gate_up_EXH"], base, K, ts, en, lora, sh, **tiles)
    torch.testing.assert_close(h_split[rows], h_ref[rows], atol=1e-4, rtol=1e-4)
    for runs in (1, 2, 8):
        h, dparts = gate_up_lora(x, c["w_gate_up_EXH"], base, K, ts, en, lora, **tiles,
                                 lora_runs=runs, fuse_down_shrink=True, down_shrink_runs=2)
        torch.testing.assert_close(h[rows], h_ref[rows], atol=1e-4, rtol=1e-4)
        assert dparts.shape[0] == 2  # I = 24 in n-tiles of 16
        dsh_ref = naive.down_shrink(h, lora, base, K, ts, en)
        lora_rows = ~torch.isnan(dsh_ref[:, 0])
        assert lora_rows.any() and not lora_rows.all()
        torch.testing.assert_close(dparts.sum(0)[lora_rows], dsh_ref[lora_rows], atol=1e-4,
                                   rtol=1e-4)


def test_rank_view_runs_the_tiles_of_the_ranks_present(monkeypatch):
    """A pool of max rank 64 whose enabled slots have rank <= 16: ``max_lora_rank=16`` runs
    16-wide rank tiles on views of the same buffers and gives the reference's result; a
    hint outside [1, pool rank] is refused."""
    c = make_case("mixed", T=12, E=4, K=2, I=24, H=32, R=64)
    lora = c["lora"]
    en = c["slot_enabled_S"].clone()
    en[:] = lora.slot_rank <= 32  # slots of rank 32 (slot 1) and 0 only
    c["slot_enabled_S"] = en
    view = lora.rank_view(32)
    assert view.max_rank == 32 and view.a_half_rows == 64
    assert view.down_a.data_ptr() == lora.down_a.data_ptr()  # a view, no copy
    from moelora_dist.kernels.moe_lora import ops as pipeline

    seen = []
    shrink = pipeline.ops.lora_shrink
    monkeypatch.setattr(pipeline.ops, "lora_shrink",
                        lambda x, lo, *a, **k: seen.append(lo.max_rank) or shrink(x, lo, *a, **k))
    got, want = _run(c, SMALL, max_lora_rank=32)
    _close(got, want, torch.float32)
    assert seen == [32]
    with pytest.raises(ValueError, match="max_lora_rank"):
        _run(c, SMALL, max_lora_rank=65)
