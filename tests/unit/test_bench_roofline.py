"""The kernel benchmark's accounting (CPU): bytes and FLOPs a case must move, its floors, the
reference rows of issue 16's table and the targets judged per row."""

import pytest
import torch

from benchmarks.kernels import peers, roofline, targets
from moelora_dist.testing.kernel_cases import make_case

ROOF = dict(hbm_bytes_per_s=4e12, bf16_flops=800e12)


def _inp(name="many_slots"):
    c = make_case(name, T=20, E=4, K=2, R=16, H=32, I=24)
    return c


def test_adapter_bytes_count_each_touched_pair_once_at_its_rank():
    c = _inp()
    lora, E, H, I = c["lora"], 4, 32, 24
    slot, ids = c["token_slot_T"].long(), c["topk_ids_TK"].long()
    want = 0
    for s in range(lora.num_slots):
        r = int(lora.slot_rank[s])
        if r == 0 or not bool(c["slot_enabled_S"][s]):
            continue
        experts = {int(e) for t in range(20) if slot[t] == s for e in ids[t] if e >= 0}
        n = len(experts)
        if n == 0:  # no valid pair: nothing of this slot needs reading
            continue
        a = 1 if bool(lora.gate_up_a_shared[s]) else n
        b = 1 if bool(lora.down_b_shared[s]) else n
        want += (a * 2 * r * H + n * 3 * I * r + b * H * r) * 4  # fp32 factors
    assert want > 0 and roofline.adapter_bytes(c) == want
    c["lora"] = None
    assert roofline.adapter_bytes(c) == 0 and roofline.adapter_flops(c) == 0


def test_floors_are_the_larger_of_bytes_and_flops():
    c = _inp("mixed")
    f = roofline.floors(c, ROOF)
    n_experts = int(c["topk_ids_TK"][c["topk_ids_TK"] >= 0].unique().numel())
    assert f["weight_bytes"] == n_experts * 3 * 24 * 32 * 4
    assert f["roofline_ms"] == pytest.approx(1e3 * max(
        (f["weight_bytes"] + f["adapter_bytes"]) / 4e12, f["flops"] / 800e12))
    assert 0 < f["adapter_floor_ms"] < f["roofline_ms"]


def test_peer_rows_cite_the_issue_and_give_the_faster_peer():
    rows = peers.rows()
    assert len(rows) == 12 * 6 and all(r["source"] == peers.SOURCE for r in rows)
    assert {r["config"].split()[0] for r in rows} == {"peer", "before"}
    assert peers.faster_peer("mixtral-8x7b", 256, lora=False) == 0.740
    assert peers.faster_peer("qwen3-30b-a3b", 64, lora=True) == 0.412
    assert peers.faster_peer("olmoe", 64, lora=True) is None


def test_targets_are_judged_per_row():
    base = dict(model="mixtral-8x7b", T=256, adapters=0, rank=0, share=0.0, ok=True,
                ms_graph=0.70, hbm_pct=90.0, bf16_peak_pct=10.0)
    assert targets.judge(base, touches_every_expert=True)[1] is True
    assert targets.judge(dict(base, ms_graph=0.80), True)[1] is False  # peer: 0.740
    assert targets.judge(dict(base, hbm_pct=60.0), True)[1] is False
    lora = dict(model="qwen3-30b-a3b", T=64, adapters=8, rank=16, share=1.0, ok=True,
                ms_graph=0.30, lora_extra_ms=0.03, adapter_floor_ms=0.025, base_ms_graph=0.27)
    text, met = targets.judge(lora, True)
    assert met is True and "1.3x" in text and "floor" in text  # 0.412 / 0.30 = 1.37
    assert targets.judge(dict(lora, lora_extra_ms=0.05), True)[1] is False  # 2x its floor
    big = dict(lora, T=4096, ms_graph=1.0, lora_extra_ms=0.2, base_ms_graph=0.8)
    assert "10% of base" in targets.judge(big, True)[0] and not targets.judge(big, True)[1]
    assert targets.judge(dict(lora, ok=False), True) == ("", "")


def test_bench_inputs_localize_the_routed_experts():
    from benchmarks.kernels import bench_common

    bench_common.MODELS["tiny-ep"] = (32, 16, 4, 24, 4)  # 4 local experts of 16
    try:
        inp = bench_common.make_inputs(bench_common.Case("tiny-ep", 40, 8, 16, 1.0),
                                       device="cpu")
    finally:
        del bench_common.MODELS["tiny-ep"]
        bench_common._WEIGHTS.clear()
    ids = inp["topk_ids_TK"]
    assert inp["w_gate_up_EXH"].shape[0] == 4 and ids.max() < 4
    assert (ids == -1).any() and (ids >= 0).any()
    assert roofline.base_flops(inp) == 2.0 * int((ids >= 0).sum()) * 3 * 32 * 24
    assert torch.isfinite(torch.tensor(roofline.floors(inp, ROOF)["roofline_ms"]))
