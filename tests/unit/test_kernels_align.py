"""Align and batch-info kernels (Triton interpreter) against their PyTorch references."""

import pytest
import torch

from moelora_dist.kernels.align import common as align_common
from moelora_dist.kernels.align import naive as align_naive
from moelora_dist.kernels.align import ops as align
from moelora_dist.lora.batch_info import build_batch_info
from moelora_dist.testing.kernel_cases import CASES, make_case


pytestmark = pytest.mark.usefixtures("poisoned_allocations")


@pytest.fixture(autouse=True, params=["one_launch", "four_launches"])
def align_path(request, monkeypatch):
    """Every test here runs on both paths of the alignment: the one-launch kernel of small
    batches (one block per alignment of the base + LoRA pair) and the four launches of large
    ones (the size limit moved so that these small cases take the other path)."""
    if request.param == "four_launches":
        monkeypatch.setattr(align, "SINGLE_LAUNCH_MAX_ITEMS", -1)
    else:
        monkeypatch.setattr(align, "SINGLE_LAUNCH_MAX_ITEMS", 1 << 30)
        monkeypatch.setattr(align, "SINGLE_LAUNCH_MAX_FILL", 1 << 30)
        monkeypatch.setattr(align, "SINGLE_LAUNCH_PAIRS", True)
    return request.param


def _keyed(al, bucket, sub):
    """Per row: -1 for padding, else the (bucket, sub) key of the item placed there."""
    ids = al.sorted_ids.long()
    pad = ids >= bucket.numel()
    safe = ids.clamp(max=bucket.numel() - 1)
    return torch.where(pad, torch.full_like(ids, -1), bucket[safe] * 1000 + sub[safe])


MODES = [("base", False), ("base", True), ("lora", False), ("lora_pairs", False)]


@pytest.mark.parametrize("mode,by_slot", MODES, ids=["base", "base_by_slot", "lora", "lora_pairs"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("block_m", [4, 16], ids=["bm4", "bm16"])
def test_align_matches_reference(case, mode, by_slot, block_m):
    c = make_case(case, T=13, E=5, K=3)
    lora = c["lora"]
    args = (c["topk_ids_TK"], c["token_slot_T"], c["slot_enabled_S"], lora.slot_rank,
            lora.gate_up_a_shared)
    kw = dict(num_experts=5, block_m=block_m, mode=mode, sort_by_slot=by_slot)
    got = align.align_items(*args, **kw)
    want = align_naive.align_items(*args, **kw)
    assert int(got.num_post_pad) == int(want.num_post_pad)
    assert torch.equal(got.block_bucket, want.block_bucket)
    bucket, sub = align_naive.item_keys(*args, num_experts=5, mode=mode, sort_by_slot=by_slot)
    # Rows may be permuted inside one (bucket, sub) run (atomics); keys per row may not.
    assert torch.equal(_keyed(got, bucket, sub), _keyed(want, bucket, sub))
    assert sorted(got.sorted_ids.tolist()) == sorted(want.sorted_ids.tolist())
    # Every item appears exactly once; a negative id is never produced.
    real = got.sorted_ids[got.sorted_ids < got.num_items]
    assert real.numel() == got.num_items and real.unique().numel() == got.num_items
    assert int(got.sorted_ids.min()) >= 0


@pytest.mark.parametrize("case", ["mixed", "many_slots", "all_invalid", "t_lt_block"])
@pytest.mark.parametrize("block_m,lora_block_m", [(4, 16), (16, 4)], ids=["bm4_16", "bm16_4"])
def test_align_base_and_lora_equals_two_single_alignments(case, block_m, lora_block_m):
    """The 4-launch pair of a LoRA call gives what the two references give, key by key."""
    c = make_case(case, T=13, E=5, K=3)
    lora = c["lora"]
    args = (c["topk_ids_TK"], c["token_slot_T"], c["slot_enabled_S"], lora.slot_rank,
            lora.gate_up_a_shared)
    pair = align.align_base_and_lora(*args, num_experts=5, block_m=block_m,
                                     lora_block_m=lora_block_m)
    for got, mode, by_slot, bm in zip(pair, ["base", "lora"], [True, False],
                                      [block_m, lora_block_m]):
        want = align_naive.align_items(*args, num_experts=5, block_m=bm, mode=mode,
                                       sort_by_slot=by_slot)
        assert got.block_m == bm and got.num_items == want.num_items
        assert int(got.num_post_pad) == int(want.num_post_pad)
        assert torch.equal(got.block_bucket, want.block_bucket)
        bucket, sub = align_naive.item_keys(*args, num_experts=5, mode=mode,
                                            sort_by_slot=by_slot)
        assert torch.equal(_keyed(got, bucket, sub), _keyed(want, bucket, sub))
        assert sorted(got.sorted_ids.tolist()) == sorted(want.sorted_ids.tolist())


def test_align_sentinel_blocks_are_last_and_marked():
    c = make_case("mixed", T=13, E=5, K=3)
    al = align.align_items(c["topk_ids_TK"], None, None, None, None, num_experts=5,
                           block_m=4)
    n_invalid = int((c["topk_ids_TK"] < 0).sum())
    assert n_invalid > 0
    n_blocks = int(al.num_post_pad) // 4
    sentinel = -(-n_invalid // 4)
    assert (al.block_bucket[n_blocks - sentinel:] == -1).all()
    assert (al.block_bucket[:n_blocks - sentinel] >= 0).all()
    # worst-case sizing: shape depends on T, K, E, BLOCK_M only
    assert al.sorted_ids.numel() == align_common.max_rows(13 * 3, 5, 4)


def test_align_rejects_missing_slot_info():
    ids = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="needs token_slot_T"):
        align.align_items(ids, None, None, None, None, num_experts=2, block_m=4, mode="lora")
    with pytest.raises(ValueError, match="unknown align mode"):
        align.align_items(ids, None, None, None, None, num_experts=2, block_m=4, mode="x")


BATCHES = {
    "neg_requests": ([0, 3, 3, 7, 8, 12], [1, -1, 0, 2, 1], [4, 0, 8, 2]),
    "empty_segment_and_rank0": ([0, 0, 5, 9], [3, 1, -1], [2, 0, 0, 4]),
    "all_base": ([0, 4, 6], [-1, -1], [4, 4]),
    "last_slot": ([0, 2, 70], [2, 2], [0, 0, 16]),
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_batch_info_matches_reference(name):
    seg, req, rank = (torch.tensor(v, dtype=torch.int32) for v in BATCHES[name])
    got = build_batch_info(seg, req, rank, backend="triton")
    want = build_batch_info(seg, req, rank, backend="torch")
    assert torch.equal(got.token_slot_T, want.token_slot_T)
    assert torch.equal(got.slot_enabled_S, want.slot_enabled_S)
    assert got.num_lora_tokens == want.num_lora_tokens
    unsynced = build_batch_info(seg, req, rank, backend="triton", validate=False,
                                num_tokens=int(seg[-1]))
    assert unsynced.num_lora_tokens is None
    assert int(unsynced.num_lora_tokens_dev) == want.num_lora_tokens


def test_batch_info_rejects_out_of_range_slot():
    seg = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside"):
        build_batch_info(seg, torch.tensor([0, 5]), torch.tensor([4, 4]), backend="triton")
