"""Batch info (reference): per-token slots and enabled slots from request segments."""

import pytest
import torch

from moelora_dist.lora.batch_info import build_batch_info

i32 = lambda *v: torch.tensor(v, dtype=torch.int32)


def _expected_token_slots(seg, req, rank):
    """Brute force: token t of request b gets req[b] if that slot has rank > 0, else -1."""
    out = []
    for b, slot in enumerate(req):
        out += [slot if slot >= 0 and rank[slot] > 0 else -1] * (seg[b + 1] - seg[b])
    return out


@pytest.mark.parametrize("seg, req, rank", [
    pytest.param([0, 2, 5, 6], [1, -1, 0], [4, 8, 2], id="base-only request in the middle"),
    pytest.param([0, 3, 3, 4], [0, 2, 1], [4, 8, 2], id="empty segment: its slot stays disabled"),
    pytest.param([0, 0, 0], [0, 1], [4, 8], id="all segments empty: T=0"),
    pytest.param([0, 5], [2], [0, 0, 4], id="one request only"),
    pytest.param([0, 2, 4], [-1, -1], [4, 8], id="every request base-only: every slot disabled"),
    pytest.param([0, 2, 4, 7], [0, 1, 1], [0, 3], id="slot of rank 0 is disabled, tokens -1"),
    pytest.param([0, 1, 2, 3, 4], [2, 2, 0, 2], [1, 1, 5], id="slot reused by several requests"),
])
def test_token_slots_and_enabled_slots(seg, req, rank):
    info = build_batch_info(i32(*seg), i32(*req), i32(*rank))
    want = _expected_token_slots(seg, req, rank)
    assert info.token_slot_T.dtype == torch.int32
    assert info.token_slot_T.tolist() == want
    assert info.num_tokens == seg[-1]
    used = {s for b, s in enumerate(req) if s >= 0 and seg[b + 1] > seg[b]}
    assert info.slot_enabled_S.dtype == torch.bool
    assert info.slot_enabled_S.tolist() == [s in used and rank[s] > 0 for s in range(len(rank))]
    assert info.num_lora_tokens == sum(t >= 0 for t in want)
    assert info.any_lora() == (info.num_lora_tokens > 0)


def test_no_requests_at_all():
    info = build_batch_info(i32(0), i32(), i32(4, 4))
    assert info.token_slot_T.numel() == 0 and not info.slot_enabled_S.any()
    assert info.num_lora_tokens == 0 and not info.any_lora()


def test_any_lora_without_host_count_reads_enabled_slots():
    info = build_batch_info(i32(0, 3), i32(1), i32(0, 2))
    info.num_lora_tokens = None  # a device path may not know it on the host
    assert info.any_lora()
    info.slot_enabled_S[:] = False
    assert not info.any_lora()


def test_accepts_int64_inputs():
    info = build_batch_info(torch.tensor([0, 2, 3]), torch.tensor([1, -1]), torch.tensor([2, 2]))
    assert info.token_slot_T.tolist() == [1, 1, -1]


@pytest.mark.parametrize("seg, req, rank, needle", [
    pytest.param([0, 2, 4], [0], [4], "seg_indptr has 3 entries but req_to_slot has 1",
                 id="length mismatch"),
    pytest.param([1, 2, 4], [0, 0], [4], "seg_indptr must start at 0", id="nonzero start"),
    pytest.param([0, 3, 2], [0, 0], [4], "non-decreasing", id="negative segment"),
    pytest.param([0, 2, 4], [0, 3], [4, 4], r"outside \[-1, 2\): \[3\]", id="slot too large"),
    pytest.param([0, 2, 4], [-2, 0], [4, 4], r"outside \[-1, 2\): \[-2\]", id="slot below -1"),
])
def test_bad_input_is_refused(seg, req, rank, needle):
    with pytest.raises(ValueError, match=needle):
        build_batch_info(i32(*seg), i32(*req), i32(*rank))


def test_bad_dims_are_refused():
    with pytest.raises(ValueError, match="must be 1-D"):
        build_batch_info(i32(0, 2).view(1, 2), i32(0), i32(4))


def test_max_rank_is_the_largest_rank_the_requests_use():
    """The rank tiles of the MoE kernels follow it: the largest rank of the slots named by a
    request (an empty request's slot too: never below a slot that can run), 0 with none; not
    known without ``validate`` unless given."""
    rank = i32(16, 64, 0, 8)
    assert build_batch_info(i32(0, 2, 3, 5), i32(0, -1, 3), rank).max_rank == 16
    assert build_batch_info(i32(0, 2, 2), i32(3, 1), rank).max_rank == 64
    assert build_batch_info(i32(0, 2), i32(-1), rank).max_rank == 0
    assert build_batch_info(i32(0, 2), i32(0), rank, validate=False).max_rank is None
    assert build_batch_info(i32(0, 2), i32(0), rank, validate=False, max_rank=16).max_rank == 16

