"""One tenant cannot hurt another: a slot holding NaN / Inf (loaded around every check, as a
bug or an attacker would) leaves every other slot's rows and every base row bit-identical.

Each test runs the same batch twice: once with the bad slot holding finite values, once with
NaN and Inf planted into all of its factors. The rows of the other slots and of the base model
must be bit-identical between the two runs (not merely close), and the bad slot's own rows
must really be non-finite (so the planted values are read, not skipped). Kernels run under
the Triton interpreter (fp32 / fp16: bf16 dots are wrong there), the references as on a CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moelora_dist.engine.engine import Engine
from moelora_dist.kernels.dense_lora import naive as dense_naive
from moelora_dist.kernels.dense_lora import ops as dense_ops
from moelora_dist.kernels.moe_lora.configs import MoEConfig
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
from moelora_dist.testing.kernel_cases import make_case
from tests.e2e_cases import REQUESTS, build_case

BAD = 3  # the slot that goes bad: enabled, rank R, per-expert factors in "many_slots"
SMALL = MoEConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1,
                  lora_block_m=16, down_block_n=16, shrink_block_k=16)


def _poison(t: torch.Tensor) -> None:
    """NaN and +-Inf all over one slot's factors (in place)."""
    t.view(-1)[0::3] = float("nan")
    t.view(-1)[1::3] = float("inf")
    t.view(-1)[2::3] = float("-inf")


def _moe_case(dtype):
    c = make_case("many_slots", T=24, E=4, K=2, R=16, dtype=dtype, seed=3)
    slot = c["token_slot_T"]
    slot[:4] = BAD  # make sure the bad slot has tokens
    slot[4:8] = -1  # and base rows
    slot[8:12] = 0  # and another slot's rows
    return c


def _bad_copy(lora):
    bad = lora._replace(**{k: getattr(lora, k).clone() for k in
                           ("gate_up_a", "gate_up_b", "down_a", "down_b")})
    for t in (bad.gate_up_a, bad.gate_up_b, bad.down_a, bad.down_b):
        _poison(t[BAD])
    return bad


def _rows(c):
    others = c["token_slot_T"] != BAD
    assert others.any() and (~others).any() and (c["token_slot_T"] == -1).any()
    return others


VARIANTS = {
    "run_loop_1": dict(lora_runs=1), "run_loop_2": dict(lora_runs=2),
    "run_loop_8": dict(lora_runs=8), "slot_loop": dict(run_loop=False, lora_runs=1),
    # the MoEConfig switches the tuner measures (tests/unit/test_kernels_lora_switches.py)
    "split_shrink": dict(shrink_split_k=2),
    "fused_down_shrink": dict(fuse_down_shrink=True),
    "fused_shrink": dict(fuse_shrink=True, lora_runs=2),
    "fused_both_slot_ds": dict(fuse_shrink=True, fuse_down_shrink=True, lora_runs=8,
                               down_shrink_runs=0),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_moe_kernels_keep_a_nan_slot_to_itself(variant, dtype):
    """Both LoRA expand loops of the Triton MoE kernels, with 1, 2 and 8 slot runs stacked in
    one dot (the stacked dot multiplies every row's zeros by the other bands' factors), and
    the fused variants (stacked shrinks: every row meets every band's factors, and keeps its
    own band by a select)."""
    c = _moe_case(dtype)
    cfg = dataclasses.replace(SMALL, **VARIANTS[variant]).check()
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"], c["token_slot_T"])
    good = fused_moe_lora(*args, c["lora"], "silu", c["slot_enabled_S"], config=cfg)
    bad = fused_moe_lora(*args, _bad_copy(c["lora"]), "silu", c["slot_enabled_S"], config=cfg)
    others = _rows(c)
    assert torch.equal(bad[others], good[others])
    assert not torch.isfinite(bad[~others]).all()


def test_moe_reference_keeps_a_nan_slot_to_itself():
    c = _moe_case(torch.float32)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"], c["token_slot_T"])
    good = experts_reference(*args, c["lora"])
    bad = experts_reference(*args, _bad_copy(c["lora"]))
    others = _rows(c)
    assert torch.equal(bad[others], good[others])
    assert not torch.isfinite(bad[~others]).all()


@pytest.mark.parametrize("impl", ["naive", "triton"])
def test_dense_lora_keeps_a_nan_slot_to_itself(impl):
    g = torch.Generator().manual_seed(0)
    S, R, I, T = 4, 16, 24, 20
    slot_T = torch.randint(-1, S, (T,), generator=g).to(torch.int32)
    slot_T[:3], slot_T[3:6] = BAD, -1
    rank_S = torch.tensor([16, 8, 0, 16], dtype=torch.int32)
    x = torch.randn(T, I, generator=g)
    a = [torch.randn(S, R, I, generator=g) * 0.1 for _ in range(3)]
    b = [torch.randn(S, o, R, generator=g) * 0.1 for o in (24, 8, 8)]
    run = dense_naive.add_dense_lora if impl == "naive" else dense_ops.add_dense_lora

    def forward(a_list, b_list):
        ys = [torch.randn(T, o, generator=torch.Generator().manual_seed(1)) for o in (24, 8, 8)]
        run(ys, x, a_list, b_list, slot_T, rank_S)
        return torch.cat(ys, dim=1)

    good = forward(a, b)
    a_bad, b_bad = [t.clone() for t in a], [t.clone() for t in b]
    for t in a_bad + b_bad:
        _poison(t[BAD])
    bad = forward(a_bad, b_bad)
    others = slot_T != BAD
    assert torch.equal(bad[others], good[others])
    assert not torch.isfinite(bad[~others]).all()


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    case = build_case("olmoe", tmp_path_factory.mktemp("olmoe"))
    engine = Engine.from_pretrained(str(case.model_dir), max_loras=2, max_rank=8,
                                    progress=False, num_pages=64, page_size=4)
    for name, path in case.adapter_dirs.items():
        engine.add_adapter(name, str(path))
    return engine


def test_model_logits_of_other_requests_are_bit_identical(olmoe):
    """The whole model on CPU (dense LoRA on q/k/v/o and the experts): a2's slot is poisoned
    in every buffer of the pool; a1's and the base requests' logits do not move by one bit."""
    engine = olmoe
    prompts, adapters = [ids for ids, _ in REQUESTS], [a for _, a in REQUESTS]
    good = engine.prompt_logits(prompts, adapters)
    pool = engine.model.pool
    slot = pool.slot_of("a2")
    saved = {k: t[slot].clone() for k, t in pool._all_tensors().items()
             if t.is_floating_point()}
    try:
        for k, t in pool._all_tensors().items():
            if t.is_floating_point():
                _poison(t[slot])
        bad = engine.prompt_logits(prompts, adapters)
    finally:
        for k, t in pool._all_tensors().items():
            if k in saved:
                t[slot].copy_(saved[k])
    for (ids, adapter), g_, b_ in zip(REQUESTS, good, bad):
        if adapter == "a2":
            assert not torch.isfinite(b_).all()
        else:
            assert torch.equal(b_, g_), adapter
