"""One tenant cannot hurt another, on the GPU in bf16: a slot holding NaN / Inf (planted
around every check) leaves every other slot's rows and every base row bit-identical.

The CPU twin is ``tests/unit/test_isolation.py``; here the Triton kernels run at real sizes in
bf16 (Qwen3-30B-A3B expert shapes, EP 4) and the dense LoRA kernels beside them; the whole
engine replaying CUDA graphs is checked in ``tests/gpu/test_engine_gpu.py``.
Run with the device tool: ``PYTHONPATH=$PWD python3 -m pytest tests/gpu -m gpu -q``.
"""

import dataclasses

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BAD = 3


def _poison(t):
    t.view(-1)[0::3] = float("nan")
    t.view(-1)[1::3] = float("inf")
    t.view(-1)[2::3] = float("-inf")


@pytest.mark.parametrize("T", [16, 700], ids=["T16", "T700"])
@pytest.mark.parametrize("run_loop", [True, False], ids=["run_loop", "slot_loop"])
def test_moe_kernels_bf16_keep_a_nan_slot_to_itself(T, run_loop):
    from moelora_dist.kernels.moe_lora.configs import pick_config
    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
    from moelora_dist.testing.kernel_cases import make_case

    c = make_case("many_slots", T=T, H=2048, E=32, I=768, K=8, R=16, dtype=torch.bfloat16,
                  device="cuda", seed=2)
    slot = c["token_slot_T"]
    slot[: T // 4] = BAD
    slot[T // 4: T // 2] = -1
    cfg = dataclasses.replace(pick_config(T, 8, 32, 8), run_loop=run_loop)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"], slot)
    good = fused_moe_lora(*args, c["lora"], "silu", c["slot_enabled_S"], config=cfg)
    lora = c["lora"]
    for t in (lora.gate_up_a, lora.gate_up_b, lora.down_a, lora.down_b):
        _poison(t[BAD])
    bad = fused_moe_lora(*args, lora, "silu", c["slot_enabled_S"], config=cfg)
    torch.cuda.synchronize()
    others = slot != BAD
    assert torch.equal(bad[others], good[others])
    assert not torch.isfinite(bad[~others]).all()


def test_dense_lora_bf16_keeps_a_nan_slot_to_itself():
    from moelora_dist.kernels.dense_lora import ops

    g = torch.Generator(device="cuda").manual_seed(1)
    S, R, I, T = 8, 16, 2048, 96
    a = [(torch.randn(S, R, I, generator=g, device="cuda") * 0.05).bfloat16() for _ in range(3)]
    b = [(torch.randn(S, o, R, generator=g, device="cuda") * 0.05).bfloat16()
         for o in (512, 128, 128)]
    rank = torch.full((S,), R, dtype=torch.int32, device="cuda")
    slot_T = torch.randint(-1, S, (T,), generator=g, device="cuda").int()
    slot_T[:8], slot_T[8:16] = BAD, -1
    x = torch.randn(T, I, generator=g, device="cuda").bfloat16()

    def run():
        ys = [torch.ones(T, o, dtype=torch.bfloat16, device="cuda") for o in (512, 128, 128)]
        ops.add_dense_lora(ys, x, a, b, slot_T, rank)
        return torch.cat(ys, 1)

    good = run()
    for t in a + b:
        _poison(t[BAD])
    bad = run()
    others = slot_T != BAD
    assert torch.equal(bad[others], good[others])
    assert not torch.isfinite(bad[~others]).all()
