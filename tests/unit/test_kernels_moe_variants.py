"""Expert variants of the MoE kernels: gate_up and down biases, gpt-oss's clamped SwiGLU, and
the interleaved gate/up layout (de-interleaved at load).

The reference (``experts_reference``) is checked against transformers' own ``GptOssExperts``
(same weights, its interleaved transposed storage); the Triton kernels (interpreter, fp32 and
fp16) against the reference with biases, clamp and LoRA together; the down bias is added once
over MoE-TP shards. Inputs exercise what they claim: the clamp engages on a fifth of the
values at ``limit = 1``, and biases move the output far beyond the tolerance.
"""

import dataclasses

import pytest
import torch

from moelora_dist.kernels.activations import glu
from moelora_dist.kernels.align.ops import align_items
from moelora_dist.kernels.constants import Activation
from moelora_dist.kernels.moe_gemm import naive, ops
from moelora_dist.kernels.moe_lora.configs import MoEConfig
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
from moelora_dist.parallel.sharding import deinterleave_gate_up
from moelora_dist.testing.kernel_cases import make_case
from tests.conftest import effective_slots

SWIGLU = Activation("swiglu_oai", alpha=1.702, limit=1.0)
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}
SMALL = MoEConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1,
                  lora_block_m=16, down_block_n=16, shrink_block_k=16)

pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _biases(c, seed=7):
    g = torch.Generator().manual_seed(seed)
    E, two_i, H = c["w_gate_up_EXH"].shape
    dt = c["x_TH"].dtype
    return (torch.randn(E, two_i, generator=g).to(dt) * 0.5,
            torch.randn(E, H, generator=g).to(dt) * 0.5)


def test_reference_matches_transformers_gpt_oss_experts():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    E, H, I, T, K = 4, 32, 24, 10, 2
    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                       swiglu_limit=SWIGLU.limit)
    cfg._experts_implementation = "eager"
    hf = GptOssExperts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    with torch.no_grad():
        want = hf(x, ids, w)
        # [T, K, 2I], interleaved, before the activation
        gate_up = torch.einsum("th,tkho->tko", x, hf.gate_up_proj[ids]) + hf.gate_up_proj_bias[ids]
    clamped = (gate_up[..., ::2] > SWIGLU.limit) | (gate_up[..., 1::2].abs() > SWIGLU.limit)
    assert clamped.float().mean() > 0.2  # the clamp engages: the test sees it
    # Our layout: [E, 2I, H] gate rows then up rows (de-interleaved), down [E, H, I].
    w_gu = deinterleave_gate_up(hf.gate_up_proj.detach().transpose(1, 2), dim=1)
    b_gu = deinterleave_gate_up(hf.gate_up_proj_bias.detach(), dim=1)
    w_d = hf.down_proj.detach().transpose(1, 2).contiguous()
    got = experts_reference(x, w_gu, w_d, w, ids.to(torch.int32), activation=SWIGLU,
                            b_gate_up_EX=b_gu, b_down_EH=hf.down_proj_bias.detach())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Without the clamp (or without the biases) the result is far from transformers'.
    loose = experts_reference(x, w_gu, w_d, w, ids.to(torch.int32),
                              activation=dataclasses.replace(SWIGLU, limit=1e9),
                              b_gate_up_EX=b_gu, b_down_EH=hf.down_proj_bias.detach())
    assert (loose - want).abs().max() > 1e-1


def test_glu_is_transformers_apply_gate():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(hidden_size=8, intermediate_size=8, num_local_experts=1, swiglu_limit=2.0)
    cfg._experts_implementation = "eager"
    hf = GptOssExperts(cfg)
    gu = torch.randn(50, 16) * 3  # interleaved, as transformers reads it
    want = hf._apply_gate(gu)
    got = glu(Activation("swiglu_oai", 1.702, 2.0), gu[:, ::2], gu[:, 1::2])
    assert torch.equal(got, want)


@pytest.mark.parametrize("run_loop", [True, False], ids=["run_loop", "slot_loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ["mixed", "many_slots", "t_lt_block", "all_invalid"])
def test_fused_kernel_with_biases_clamp_and_lora(case, dtype, run_loop):
    c = make_case(case, T=20, E=4, K=2, R=16, dtype=dtype)
    b_gu, b_d = _biases(c)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    cfg = dataclasses.replace(SMALL, run_loop=run_loop)
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], SWIGLU, c["slot_enabled_S"],
                         config=cfg, b_gate_up_EX=b_gu, b_down_EH=b_d)
    want = experts_reference(*args, effective_slots(c), c["lora"], SWIGLU, b_gu, b_d)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    if case == "all_invalid":
        assert torch.equal(got, torch.zeros_like(got))  # no pair: no bias either
    else:  # the biases and the clamp are really applied by the kernels
        plain = fused_moe_lora(*args, c["token_slot_T"], c["lora"], "silu",
                               c["slot_enabled_S"], config=cfg)
        assert (got.float() - plain.float()).abs().max() > 0.1


def test_stages_with_biases_match_their_references():
    c = make_case("mixed", T=20, E=4, K=2, R=16)
    b_gu, b_d = _biases(c)
    x, lora, K, ts, en = c["x_TH"], c["lora"], 2, c["token_slot_T"], c["slot_enabled_S"]
    base = align_items(c["topk_ids_TK"], ts, en, lora.slot_rank, None, num_experts=4,
                       block_m=16, mode="base", sort_by_slot=True)
    la = align_items(c["topk_ids_TK"], ts, en, lora.slot_rank, lora.gate_up_a_shared,
                     num_experts=4, block_m=16, mode="lora")
    sh = ops.lora_shrink(x, lora, la, K, block_k=16)
    tiles = dict(block_n=16, block_k=16, num_stages=1)
    h = ops.gate_up(x, c["w_gate_up_EXH"], base, K, ts, en, lora, sh, SWIGLU, b_gu, **tiles)
    h_ref = naive.gate_up(x, c["w_gate_up_EXH"], base, K, ts, en, lora, sh, SWIGLU, b_gu)
    rows = ~torch.isnan(h_ref[:, 0])
    torch.testing.assert_close(h[rows], h_ref[rows], atol=1e-4, rtol=1e-4)
    dsh = ops.down_shrink(h, lora, base, K, ts, en, block_k=16)
    out = ops.down(h, c["w_down_EHI"], c["topk_weights_TK"], base, K, ts, en, lora, dsh, b_d,
                   **tiles)
    out_ref = naive.down(h, c["w_down_EHI"], c["topk_weights_TK"], base, K, ts, en, lora, dsh,
                         b_d)
    torch.testing.assert_close(out[rows], out_ref[rows], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_down_bias_is_added_once_over_moe_tp_shards(backend):
    """Two MoE-TP shards of I: their partial outputs sum to the full layer when the down bias
    is given to one shard only; given to both it would count twice (the test sees that)."""
    c = make_case("mixed", T=16, E=4, K=2, I=24)
    b_gu, b_d = _biases(c)
    wgu, wd, I = c["w_gate_up_EXH"], c["w_down_EHI"], 24
    args = (c["topk_weights_TK"], c["topk_ids_TK"])
    full = experts_reference(c["x_TH"], wgu, wd, *args, activation=SWIGLU, b_gate_up_EX=b_gu,
                             b_down_EH=b_d)
    parts = []
    for r, (lo, hi) in enumerate([(0, 12), (12, 24)]):
        rows = torch.cat([torch.arange(lo, hi), torch.arange(I + lo, I + hi)])
        kw = dict(b_gate_up_EX=b_gu[:, rows].contiguous(), b_down_EH=b_d if r == 0 else None)
        shard = (c["x_TH"], wgu[:, rows].contiguous(), wd[:, :, lo:hi].contiguous(), *args)
        if backend == "torch":
            parts.append(experts_reference(*shard, activation=SWIGLU, **kw))
        else:
            parts.append(fused_moe_lora(*shard, activation=SWIGLU, config=SMALL, **kw))
    torch.testing.assert_close(parts[0] + parts[1], full, atol=1e-4, rtol=1e-4)
    twice = experts_reference(c["x_TH"], wgu[:, :0], wd[:, :, :0], *args, activation=SWIGLU,
                              b_gate_up_EX=b_gu[:, :0], b_down_EH=b_d)
    assert twice.abs().max() > 0.1  # the bias alone: a second copy would move the sum


def test_deinterleave_gate_up():
    t = torch.arange(12).view(2, 6)  # g0 u0 g1 u1 g2 u2
    assert deinterleave_gate_up(t, 1).tolist() == [[0, 2, 4, 1, 3, 5], [6, 8, 10, 7, 9, 11]]
    with pytest.raises(ValueError, match="even size"):
        deinterleave_gate_up(torch.zeros(3, 5), 1)


@pytest.mark.parametrize("variant", ["split_shrink", "fused_down_shrink", "fused_shrink_1run",
                                     "fused_both", "slot_loop_fused_ds_split"])
@pytest.mark.parametrize("case", ["mixed", "many_slots"])
def test_biases_and_clamp_under_every_lora_switch(case, variant):
    """Every ``MoEConfig`` switch the tuner may pick keeps gpt-oss's biases and clamp: the
    H-split shrink and the down shrink in the gate_up epilogue run them; a fused-shrink
    config takes the separate shrink for these experts (that kernel has no such variant)."""
    from tests.unit.test_kernels_lora_switches import VARIANTS

    c = make_case(case, T=20, E=4, K=2, R=16)
    b_gu, b_d = _biases(c)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], SWIGLU, c["slot_enabled_S"],
                         config=VARIANTS[variant].check(), b_gate_up_EX=b_gu, b_down_EH=b_d)
    want = experts_reference(*args, effective_slots(c), c["lora"], SWIGLU, b_gu, b_d)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), **TOL[torch.float32])


def test_fused_shrink_kernel_refuses_the_clamped_swiglu():
    from moelora_dist.kernels.moe_gemm.ops_fused import gate_up_lora

    c = make_case("mixed", T=8, E=4, K=2, R=16)
    base = align_items(c["topk_ids_TK"], None, None, None, None, num_experts=4, block_m=16,
                       mode="base")
    with pytest.raises(ValueError, match="clamped-SwiGLU"):
        gate_up_lora(c["x_TH"], c["w_gate_up_EXH"], base, 2, c["token_slot_T"],
                     c["slot_enabled_S"], c["lora"], SWIGLU)
