"""Every entry of every tuned file, run on the device against the reference, and the LoRA
variants the tuner measures in bf16 at real sizes.

Run with the device tool: ``PYTHONPATH=$PWD python3 -m pytest tests/gpu -m gpu -q`` (after the
tuner wrote its file: the entries of the shipped files and of ``$MOELORA_KERNEL_CONFIGS``).
Tolerance as in ``test_kernels_gpu.py``: a few bf16 ulps of the output's magnitude. Each
entry runs at its own shape and token count with the inputs the tuner times (random weights,
softmax routing, 8 adapters on the tokens for a LoRA entry): its sampled reference rows (exact
for any batch) and its whole output against the heuristic config's output. An entry of a
``+fp8`` dtype key runs on FP8 experts (the same weights block-quantized, as the tuner built
them); the tuner's tolerance covers them (``tuning/measure.py``).
"""

import dataclasses

import pytest
import torch

from tests.conftest import effective_slots

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BF16_RTOL = 2e-2


def _entries():
    """Every (device, shape, dtype key, mode, T, config) of the tuned files, ``+fp8`` keys
    included."""
    from moelora_dist.kernels.moe_lora import tuned

    out = []
    for (device, shape, dtype, mode), table in sorted(tuned.table().items(), key=str):
        for T in sorted(table):
            out.append(pytest.param(device, shape, dtype, mode, T, table[T],
                                    id=f"{device}/{shape}/{dtype}/{mode}/T{T}"))
    return out


def test_tuned_files_exist_for_this_device():
    """The package ships a tuned file for the GPU the tests run on (the tuner writes it)."""
    from moelora_dist.kernels.moe_lora import tuned

    name = torch.cuda.get_device_name()
    assert any(key[0] == name for key in tuned.table()), (
        f"no tuned entries for {name!r} in {tuned.PACKAGE_DIR}: run moelora-dist tune-kernels "
        f"--out {tuned.PACKAGE_DIR / tuned.file_name(name)}")


@pytest.mark.parametrize("device,shape,dtype,mode,T,cfg", _entries())
def test_tuned_entry_matches_reference(device, shape, dtype, mode, T, cfg):
    from moelora_dist.kernels.moe_lora.configs import heuristic_config
    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
    from moelora_dist.tuning.measure import check
    from moelora_dist.tuning.problems import entry_problem, make_inputs, reference_rows

    if device != torch.cuda.get_device_name():
        pytest.skip(f"an entry for {device}, not this GPU")
    problem = entry_problem(shape, dtype, mode, T)  # FP8 experts for a "+fp8" key
    rank = problem.rank
    inp = make_inputs(problem, "cuda", seed=T)
    ref = reference_rows(inp)
    slots = 1 if rank is None else inp["lora"].num_slots
    default_y = fused_moe_lora(**inp, config=heuristic_config(T, shape.top_k,
                                                              shape.num_experts, slots))
    assert check(default_y, ref) is None
    y = fused_moe_lora(**inp, config=cfg)
    assert check(y, ref, default_y) is None, check(y, ref, default_y)
    if rank is not None:  # the delta is there at this tolerance
        base = fused_moe_lora(**{**inp, "lora": None}, config=cfg)
        assert (y.float() - base.float()).abs().max() > 5 * BF16_RTOL * ref.scale


# Sized to fit shared memory at the heuristic's tiles (a fused shrink stacks lora_runs x BR
# columns of A into every pipeline stage); a config that does not fit is the tuner's to skip.
VARIANTS = {
    "split_shrink_4": dict(shrink_split_k=4),
    "fused_down_shrink": dict(fuse_down_shrink=True),
    "fused_shrink": dict(fuse_shrink=True, run_loop=True, lora_runs=2),
    "fused_both": dict(fuse_shrink=True, fuse_down_shrink=True, run_loop=True, lora_runs=1),
}


def _case(name, T, R=16):
    from moelora_dist.testing.kernel_cases import make_case

    # Qwen3-30B-A3B expert sizes with 32 local experts (EP 4), K 8, ranks R, R/2, 0, R.
    return make_case(name, T=T, H=2048, E=32, I=768, K=8, R=R, dtype=torch.bfloat16,
                     device="cuda", seed=1)


@pytest.mark.parametrize("tiles", ["decode", "prefill"])
@pytest.mark.parametrize("T", [5, 64, 700], ids=["T5", "T64", "T700"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", ["mixed", "many_slots"])
def test_lora_variant_bf16_matches_reference(case, variant, T, tiles):
    """Each switch at 16x64 (decode) and 128x128 / 8 warps (prefill) tiles, bf16, ranks 16,
    8, 0 (disabled) and 16."""
    from moelora_dist.kernels.moe_lora.configs import heuristic_config
    from moelora_dist.kernels.moe_lora.naive import experts_reference
    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora

    c = _case(case, T)
    base_cfg = heuristic_config(8 if tiles == "decode" else 4096, 8, 32, 8)
    cfg = dataclasses.replace(base_cfg, **VARIANTS[variant]).check()
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], "silu", c["slot_enabled_S"],
                         config=cfg)
    want = experts_reference(*args, effective_slots(c), c["lora"])
    assert not torch.isnan(got).any()
    scale = max(1.0, float(want.float().abs().max()))
    torch.testing.assert_close(got.float(), want.float(), atol=BF16_RTOL * scale,
                               rtol=BF16_RTOL)


@pytest.mark.parametrize("variant", ["split_shrink_4", "fused_both"])
def test_lora_variant_rank128_and_graph_replay_equal_eager(variant):
    """Rank 128 (BR 128) runs right, and a replay of a captured call equals eager bit for bit
    (no atomics: the partial sums are added in a fixed order)."""
    from moelora_dist.kernels.moe_lora.configs import heuristic_config
    from moelora_dist.kernels.moe_lora.naive import experts_reference
    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora

    c = _case("mixed", 48, R=128)
    # BR 128: one run per stacked dot and two pipeline stages keep the fused A tiles in
    # shared memory.
    cfg = dataclasses.replace(heuristic_config(48, 8, 32, 4), **VARIANTS[variant],
                              num_stages=2).check()
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"], c["token_slot_T"], c["lora"], "silu", c["slot_enabled_S"])

    def step():
        return fused_moe_lora(*args, config=cfg, num_lora_tokens=48)

    eager = step()
    want = experts_reference(*args[:5], effective_slots(c), c["lora"])
    scale = max(1.0, float(want.float().abs().max()))
    torch.testing.assert_close(eager.float(), want.float(), atol=BF16_RTOL * scale,
                               rtol=BF16_RTOL)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_static, eager)


def test_rank_view_on_gpu_matches_the_full_rank_tiles():
    """A rank-128 pool serving rank <= 32 adapters: 32-wide tiles give the reference's result."""
    from moelora_dist.kernels.moe_lora.naive import experts_reference
    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora

    c = _case("mixed", 64, R=128)
    lora = c["lora"]
    en = lora.slot_rank <= 64  # ranks 128, 64, 0, 128: slot 1 (64) and the empty slot 2
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], lora, "silu", en, max_lora_rank=64)
    want = experts_reference(*args, effective_slots({**c, "slot_enabled_S": en}), lora)
    scale = max(1.0, float(want.float().abs().max()))
    torch.testing.assert_close(got.float(), want.float(), atol=BF16_RTOL * scale,
                               rtol=BF16_RTOL)
