"""The tuner on FP8 experts, on a CPU (kernels in the Triton interpreter with its e4m3 cast
fixed, fp16 activations: bf16 dots are wrong there, so the CPU entries are ``float16+fp8``; the
``bfloat16+fp8`` key is checked on a file built without running kernels): the candidate space
(one candidate per kernel run, no fused shrink), the FP8 inputs, the check before timing, the
file that holds bf16 and FP8 entries side by side, and the layer's FP8 calls reading it back.
The GPU half: tests/gpu/test_tuned_configs_gpu.py runs every ``+fp8`` entry on the device."""

import dataclasses
import json

import pytest
import torch

from moelora_dist.cli.main import main as cli
from moelora_dist.kernels.block_fp8.naive import dequantize
from moelora_dist.kernels.moe_lora import ops as moe_lora_ops
from moelora_dist.kernels.moe_lora import tuned
from moelora_dist.kernels.moe_lora.configs import MoEConfig, heuristic_config
from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight
from moelora_dist.tuning import output, search, space
from moelora_dist.tuning.measure import TOLERANCE, WallTimer
from moelora_dist.tuning.problems import (Problem, entry_problem, make_inputs, parse_dtype_key,
                                          parse_shape, reference_rows)

TINY = parse_shape("32,4,2,24")
SMALL_TILES = {16: [(16, 16, 4, 1), (32, 16, 4, 2)]}  # keeps the interpreter run short

pytestmark = pytest.mark.usefixtures("e4m3_cast")


@pytest.fixture
def small_space(monkeypatch):
    monkeypatch.setattr(space, "TILES", SMALL_TILES)
    monkeypatch.setattr(space, "FP8_EXTRA_TILES", {16: [(16, 128, 4, 3)]})


def _kernel_key(cfg: MoEConfig):
    """What the FP8 kernels run for ``cfg``: block_k 128 in gate_up and down whatever it says;
    the fused shrink is never taken."""
    return dataclasses.replace(cfg, block_k=128, down_block_k=128, fuse_shrink=False)


@pytest.mark.parametrize("T,E_l,K", [(1, 128, 8), (64, 128, 8), (4096, 32, 8), (16384, 8, 2)],
                         ids=["decode", "qwen3_T64", "deepseek_T4096", "mixtral_T16384"])
def test_fp8_candidates_are_distinct_kernels_without_fused_shrink(T, E_l, K):
    heur = space.for_fp8(heuristic_config(T, K, E_l, 1))
    rows = T * K / E_l
    cands = []
    for bm in space.block_ms(rows, heur.block_m):
        gus = space.gate_up_tiles(heur, bm, fp8=True)
        dns = space.down_tiles(gus[0], fp8=True)
        for group in (gus, dns):
            assert len({_kernel_key(c) for c in group}) == len(group)  # no repeated kernel
        cands += gus + dns
    lora = space.lora_candidates(heur, space.for_fp8(heuristic_config(T, K, E_l, 8)),
                                 rows_per_expert=rows, adapters=8, inter=768, fp8=True)
    assert len({_kernel_key(c) for c in lora}) == len(lora)
    for c in cands + lora:
        assert (c.block_k, c.down_block_k, c.fuse_shrink) == (128, None, False), c
        c.check()
    # the bf16 space of the same problem does try fused shrinks (I_l 768: few n-tiles) and
    # other K steps
    bf16 = space.lora_candidates(heuristic_config(T, K, E_l, 1), heuristic_config(T, K, E_l, 8),
                                 rows_per_expert=rows, adapters=8, inter=768)
    assert any(c.fuse_shrink for c in bf16)
    assert {c.block_k for c in space.gate_up_tiles(heuristic_config(T, K, E_l, 1), 16)} != {128}


def test_fp8_tile_lists_add_register_friendly_tiles_and_keep_bf16_lists():
    big = space.fp8_tiles(128)
    assert {(64, 4), (64, 8)} <= {(n, w) for n, _, w, _ in big}  # narrower n at 128 rows
    assert {s for n, _, _, s in space.fp8_tiles(64) if n == 64} >= {4, 5}
    for bm, tiles in space.TILES.items():
        fp8 = space.fp8_tiles(bm)
        assert len(set(fp8)) == len(fp8) and {k for _, k, _, _ in fp8} == {128}
        assert {(n, w, s) for n, _, w, s in tiles} <= {(n, w, s) for n, _, w, s in fp8}
    assert space.TILES[128][0] == (128, 64, 8, 3)  # the bf16 lists stay as tuned before


def test_fp8_inputs_quantize_the_bf16_problems_weights():
    p16 = Problem(TINY, 4, dtype="float16")
    p8 = dataclasses.replace(p16, fp8=True)
    assert (p8.dtype_key, p16.dtype_key) == ("float16+fp8", "float16")
    w16 = make_inputs(p16, "cpu")
    w8 = make_inputs(p8, "cpu")
    E, I, H = TINY.local_experts, TINY.local_inter, TINY.hidden
    for name, n, k in (("w_gate_up_EXH", 2 * I, H), ("w_down_EHI", H, I)):
        w = w8[name]
        assert isinstance(w, BlockFP8Weight) and w.weight.shape == (E, n, k)
        assert w.scale_inv.shape == (E, -(-n // 128), -(-k // 128))
        w.check()
        # e4m3 keeps 3 mantissa bits: within 1/16 of each block's largest value
        torch.testing.assert_close(dequantize(w), w16[name].float(), rtol=0.07,
                                   atol=float(w16[name].float().abs().max()) / 16)
    assert torch.equal(w8["x_TH"], w16["x_TH"]) and torch.equal(w8["topk_ids_TK"],
                                                                 w16["topk_ids_TK"])
    empty = make_inputs(Problem(parse_shape("256,4,2,200"), 4, 16, adapters=2, fp8=True), "cpu",
                        fill="empty")
    gu, d = empty["w_gate_up_EXH"], empty["w_down_EHI"]
    assert gu.weight.dtype == torch.float8_e4m3fn and gu.scale_inv.dtype == torch.float32
    assert (tuple(gu.scale_inv.shape), tuple(d.scale_inv.shape)) == ((4, 4, 2), (4, 2, 2))
    gu.check(), d.check()


def test_dtype_keys_and_entry_problems():
    assert parse_dtype_key("bfloat16+fp8") == ("bfloat16", True)
    assert parse_dtype_key("float16") == ("float16", False)
    for bad in ("fp8", "bfloat16+fp4", "float32+fp8", "+fp8"):
        with pytest.raises(ValueError):
            parse_dtype_key(bad)
    key = tuned.ShapeKey(2048, 32, 8, 768)
    p = entry_problem(key, "bfloat16+fp8", "lora_r16", 64)
    assert (p.shape.key, p.dtype, p.fp8, p.rank, p.mode, p.dtype_key) == (
        key, "bfloat16", True, 16, "lora_r16", "bfloat16+fp8")
    assert entry_problem(key, "bfloat16", "base", 1).fp8 is False
    with pytest.raises(ValueError, match="mode"):
        entry_problem(key, "bfloat16", "lora", 1)


def test_fp8_tuner_checks_candidates_and_its_best_matches_the_reference(small_space,
                                                                        monkeypatch):
    """Base and LoRA on FP8 experts: every timed candidate runs block_k 128; one candidate
    given wrong scales (a kernel reading the wrong scale block) is caught by the check; the
    best configs match experts_reference on every row within the tuner's tolerance."""
    p_base = Problem(TINY, 6, dtype="float16", fp8=True)
    p_lora = Problem(TINY, 6, 16, adapters=4, dtype="float16", fp8=True)
    heur = space.for_fp8(heuristic_config(6, 2, 4, 1))
    wrong = space.gate_up_tiles(heur, 16, fp8=True)[1]
    run = search.run_layer

    def run_layer(inp, cfg):
        if cfg == wrong:  # expert 0's gate_up scales doubled
            w = inp["w_gate_up_EXH"]
            s = w.scale_inv.clone()
            s[0] *= 2
            inp = {**inp, "w_gate_up_EXH": w._replace(scale_inv=s)}
        return run(inp, cfg)

    monkeypatch.setattr(search, "run_layer", run_layer)
    seen, now = [], [0.0]
    wall = WallTimer()

    def timer(fn, est):  # the wall time ranks candidates; the budget counts 1 s per timing
        ms = wall(fn, est)
        now[0] += 1.0
        return ms

    class Pool:
        def submit(self, problem, cfg):
            pass

        def result(self, problem, cfg, timeout):
            seen.append(cfg)
            return None

    # 16 timings: the base phase whole (about 8), LoRA round one cut short (the interpreter
    # takes ~0.4 s per candidate)
    tuner = search.Tuner([p_base], [p_lora], device="cpu", pool=Pool(), timer=timer,
                         budget_s=16, clock=lambda: now[0], progress=False)
    outcomes, skipped = tuner.run()
    assert {(s.config, s.reason.split(" by")[0]) for s in skipped} == {
        (wrong, "differs from the reference")}
    assert seen and all(c.block_k == 128 and not c.fuse_shrink for c in seen)
    by = {o.problem: o for o in outcomes}
    assert set(by) == {p_base, p_lora} and by[p_base].config != wrong
    for p, o in by.items():
        inp = make_inputs(p, "cpu")
        assert isinstance(inp["w_gate_up_EXH"], BlockFP8Weight)
        ref = reference_rows(inp, sample=1000)  # every row
        assert ref.error(fused_moe_lora(**inp, config=o.config)) < TOLERANCE / 4


def _fp8_call_config(x_TH, shape_key, fp8: bool, lora=None):
    """What the layer picks for a call on ``shape_key``'s experts (FP8 or not) on this CPU,
    taken as the tuned files' device "cpu"."""
    E, K, I, H = shape_key.num_experts, shape_key.top_k, shape_key.inter, shape_key.hidden
    w = torch.zeros(E, 2 * I, H, dtype=x_TH.dtype)
    if fp8:
        w = BlockFP8Weight(w.to(torch.float8_e4m3fn), torch.ones(E, -(-2 * I // 128),
                                                                 -(-H // 128)))
    return (moe_lora_ops.config_for(x_TH, w, K, lora),
            moe_lora_ops.config_source(x_TH, w, K, lora))


@pytest.fixture
def cpu_named_device(monkeypatch):
    """The layer looks tuned files up by CUDA device name, None on a CPU; here it is "cpu",
    the device name the CPU tuner writes."""
    monkeypatch.setattr(moe_lora_ops, "device_name", lambda device: "cpu")
    yield
    monkeypatch.delenv(tuned.ENV_VAR, raising=False)
    tuned.reload()


def test_cli_fp8_run_beside_a_plain_run_and_fp8_calls_pick_its_entries(tmp_path, small_space,
                                                                       cpu_named_device,
                                                                       monkeypatch):
    """tune-kernels --device cpu, plain then --fp8 into one file: both dtype keys are there
    (the second run kept the first one's entries), and the layer's FP8 call picks the
    ``+fp8`` entry while its plain call picks the plain one."""
    out = tmp_path / "cpu.json"

    def tune(budget_s: int, *more: str) -> int:
        return cli(["tune-kernels", "--shape", "32,4,2,24", "--tokens", "4", "--device", "cpu",
                    "--dtype", "float16", "--budget-s", str(budget_s), "--quiet", "--out",
                    str(out), *more])

    assert tune(12) == 0
    # a short budget: the heuristic is always measured, so every problem gets an entry
    assert tune(6, "--fp8", "--lora", "--adapters", "2") == 0
    data = json.loads(out.read_text())
    shape = data["shapes"]["32,4,2,24"]
    assert len(data["runs"]) == 2 and [r["dtype"] for r in data["runs"]] == [
        "float16", "float16+fp8"]
    assert set(shape) == {"name", "float16", "float16+fp8"}
    assert set(shape["float16"]) == {"base"} and set(shape["float16+fp8"]) == {"base",
                                                                               "lora_r16"}
    fp8_base = MoEConfig.from_dict(shape["float16+fp8"]["base"]["4"]["config"])
    fp8_lora = MoEConfig.from_dict(shape["float16+fp8"]["lora_r16"]["4"]["config"])
    plain = MoEConfig.from_dict(shape["float16"]["base"]["4"]["config"])
    assert fp8_base.block_k == fp8_lora.block_k == 128
    monkeypatch.setenv(tuned.ENV_VAR, str(out))
    tuned.reload()
    key = tuned.ShapeKey(32, 4, 2, 24)
    x = torch.zeros(4, 32, dtype=torch.float16)
    assert _fp8_call_config(x, key, fp8=True) == (fp8_base, "tuned")
    assert _fp8_call_config(x, key, fp8=False) == (plain, "tuned")
    lora = make_inputs(Problem(TINY, 4, 16, adapters=2, dtype="float16", fp8=True), "cpu")["lora"]
    assert _fp8_call_config(x, key, fp8=True, lora=lora) == (fp8_lora, "tuned")


def _outcome(p: Problem, **tiles) -> search.Outcome:
    return search.Outcome(p, MoEConfig(**tiles).check(), 1.0, 2.0, 3, 0)


def test_bf16_and_fp8_runs_merge_into_one_file(tmp_path, cpu_named_device, monkeypatch):
    """A bf16 run, then an FP8 run of the same shape into the same file (built without
    kernels): both dtype keys and both runs' skips stay; a later bf16 run replaces only its own
    entries and skips. The layer's bf16 call on FP8 experts picks ``bfloat16+fp8``."""
    path = tmp_path / "cpu.json"
    bf16 = Problem(TINY, 64)
    fp8 = Problem(TINY, 64, fp8=True)
    fp8_lora = Problem(TINY, 64, 16, fp8=True)
    runs = [
        ([_outcome(bf16, block_m=32, block_k=64)],
         [search.Skip(bf16, MoEConfig(block_m=16), "OutOfResources: shared memory")]),
        ([_outcome(fp8, block_m=64, block_n=64, block_k=128),
          _outcome(fp8_lora, block_m=64, block_n=64, block_k=128, lora_runs=4)],
         [search.Skip(fp8, MoEConfig(block_m=128), "differs from the reference by 1")]),
        ([_outcome(bf16, block_m=16, block_k=256)], []),
    ]
    files = []
    for i, (outcomes, skipped) in enumerate(runs):
        data = output.build("cpu", outcomes, skipped, {"run": i},
                            output.load_previous(path, "cpu"))
        output.write(path, data)
        files.append(json.loads(path.read_text()))
    after_fp8, data = files[1], files[2]
    assert set(after_fp8["shapes"]["32,4,2,24"]) == {"name", "bfloat16", "bfloat16+fp8"}
    assert after_fp8["shapes"]["32,4,2,24"]["bfloat16"] == files[0]["shapes"]["32,4,2,24"][
        "bfloat16"]
    assert [s["dtype"] for s in after_fp8["skipped"]] == ["bfloat16", "bfloat16+fp8"]
    shape = data["shapes"]["32,4,2,24"]
    assert set(shape) == {"name", "bfloat16", "bfloat16+fp8"}
    assert shape["bfloat16"]["base"]["64"]["config"]["block_k"] == 256  # the third run's
    assert shape["bfloat16+fp8"] == after_fp8["shapes"]["32,4,2,24"]["bfloat16+fp8"]
    assert set(shape["bfloat16+fp8"]) == {"base", "lora_r16"}
    # the re-tuned bf16 entry drops its old skip, the FP8 one's stays
    assert [s["dtype"] for s in data["skipped"]] == ["bfloat16+fp8"]
    assert [r["run"] for r in data["runs"]] == [0, 1, 2]
    monkeypatch.setenv(tuned.ENV_VAR, str(path))
    tuned.reload()
    key = tuned.ShapeKey(32, 4, 2, 24)
    x = torch.zeros(64, 32, dtype=torch.bfloat16)
    got_fp8, source = _fp8_call_config(x, key, fp8=True)
    assert source == "tuned" and (got_fp8.block_m, got_fp8.block_k) == (64, 128)
    got_bf16, _ = _fp8_call_config(x, key, fp8=False)
    assert (got_bf16.block_m, got_bf16.block_k) == (16, 256)


def test_gpu_entry_test_collects_fp8_entries(tmp_path, monkeypatch):
    """tests/gpu/test_tuned_configs_gpu.py parametrizes over every tuned entry: a file with
    ``+fp8`` entries gives FP8 cases, each built on FP8 experts by entry_problem."""
    from tests.gpu import test_tuned_configs_gpu as gpu_test

    p = Problem(TINY, 64, fp8=True)
    path = tmp_path / "cpu.json"
    output.write(path, output.build("cpu", [_outcome(p, block_k=128)], [], {}, None))
    monkeypatch.setenv(tuned.ENV_VAR, str(path))
    tuned.reload()
    try:
        params = [e for e in gpu_test._entries() if e.values[0] == "cpu"]
    finally:
        monkeypatch.delenv(tuned.ENV_VAR)
        tuned.reload()
    assert [e.id for e in params] == ["cpu/32,4,2,24/bfloat16+fp8/base/T64"]
    device, shape, dtype, mode, T, cfg = params[0].values
    assert entry_problem(shape, dtype, mode, T).fp8 and cfg.block_k == 128


@pytest.mark.parametrize("inloop_faster", [True, False])
def test_fp8_base_tuning_measures_the_in_loop_quantization_too(small_space, monkeypatch,
                                                               inloop_faster):
    """After the tiles, the winner runs once more with ``fp8_prequant=False`` (x and h
    quantized in the GEMMs' K loops) and the faster of the two is written."""
    p_base = Problem(TINY, 6, dtype="float16", fp8=True)
    run, cur, now = search.run_layer, [None], [0.0]

    def run_layer(inp, cfg):
        cur[0] = cfg
        return run(inp, cfg)

    def timer(fn, est):  # whole-layer timings rank by the quantization switch alone
        fn()
        now[0] += 0.01
        cfg, cur[0] = cur[0], None
        if cfg is None:  # a gate_up or down stage
            return 1.0
        return 1.0 if cfg.fp8_prequant == inloop_faster else 0.5

    class Pool:
        def submit(self, problem, cfg):
            pass

        def result(self, problem, cfg, timeout):
            return None

    monkeypatch.setattr(search, "run_layer", run_layer)
    tuner = search.Tuner([p_base], [], device="cpu", pool=Pool(), timer=timer, budget_s=100,
                         clock=lambda: now[0], progress=False)
    outcomes, skipped = tuner.run()
    assert not skipped and outcomes[0].config.fp8_prequant is (not inloop_faster)


def test_keep_faster_replaces_only_the_entries_this_run_beat(tmp_path):
    """``tune-kernels --keep-faster``: of a run's outcomes only those faster than the entry the
    file records (or new problems) replace it; a slower one leaves the recorded config."""
    path = tmp_path / "cpu.json"
    p64, p16, p256 = Problem(TINY, 64), Problem(TINY, 16), Problem(TINY, 256)
    first = [search.Outcome(p64, MoEConfig(block_m=32).check(), 1.0, 2.0, 3, 0),
             search.Outcome(p16, MoEConfig(block_m=16).check(), 1.0, 2.0, 3, 0)]
    output.write(path, output.build("cpu", first, [], {"run": 0}, None))
    second = [search.Outcome(p64, MoEConfig(block_m=64).check(), 1.5, 2.0, 3, 0),  # slower
              search.Outcome(p16, MoEConfig(block_m=32).check(), 0.5, 2.0, 3, 0),  # faster
              search.Outcome(p256, MoEConfig(block_m=64).check(), 9.0, 9.0, 3, 0)]  # new
    previous = output.load_previous(path, "cpu")
    kept, dropped = output.faster_only(second, previous)
    assert [o.problem for o in kept] == [p16, p256] and dropped == 1
    output.write(path, output.build("cpu", kept, [], {"run": 1}, previous))
    table = json.loads(path.read_text())["shapes"]["32,4,2,24"]["bfloat16"]["base"]
    assert {t: e["config"]["block_m"] for t, e in table.items()} == {"64": 32, "16": 32,
                                                                      "256": 64}
    assert table["64"]["ms"] == 1.0


def test_keep_faster_run_record_counts_what_it_wrote(tmp_path, small_space, monkeypatch):
    """The run record of ``--keep-faster``: ``tuned`` the problems the run found a config for,
    ``entries`` those it wrote (here none: the file's recorded time is made to win), and
    ``kept_previous`` the rest."""
    out = tmp_path / "cpu.json"
    args = ["tune-kernels", "--shape", "32,4,2,24", "--tokens", "4", "--device", "cpu",
            "--dtype", "float16", "--budget-s", "6", "--quiet", "--out", str(out)]
    assert cli(args) == 0
    monkeypatch.setattr(output, "faster_only", lambda outcomes, previous: ([], len(outcomes)))
    assert cli(args + ["--keep-faster"]) == 0
    first, second = json.loads(out.read_text())["runs"]
    assert first["tuned"] == first["entries"] == 1 and "kept_previous" not in first
    assert (second["tuned"], second["entries"], second["kept_previous"]) == (1, 0, 1)
