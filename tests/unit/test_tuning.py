"""The tuner on a CPU (kernels in the Triton interpreter, fp16: bf16 dots are wrong there):
its candidates, its checks before timing, failures recorded, the budget, the file it writes
and pick_config reading that file back. The GPU half (CUDA-graph timing, compile workers on
the device) runs in tests/gpu/test_tuned_configs_gpu.py and the lead's tuning run; FP8
experts in test_tuning_fp8.py."""

import dataclasses
import json
import math

import pytest
import torch

from moelora_dist.cli.main import main as cli
from moelora_dist.kernels.moe_lora import tuned
from moelora_dist.kernels.moe_lora.configs import MoEConfig, heuristic_config, pick_config
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
from moelora_dist.tuning import output, search, space
from moelora_dist.tuning.compile_pool import PENDING, CompilePool
from moelora_dist.tuning.measure import WallTimer
from moelora_dist.tuning.problems import (Problem, make_inputs, parse_shape, reference_rows,
                                          rows_per_expert)

TINY = parse_shape("32,4,2,24")
SMALL_TILES = {16: [(16, 16, 4, 1), (32, 16, 4, 2)]}  # keeps the interpreter run short


def test_presets_and_custom_shapes():
    ds = parse_shape("deepseek-v3-routed")
    assert (ds.local_experts, ds.key) == (32, tuned.ShapeKey(7168, 32, 8, 2048))
    assert parse_shape("4096,8,2,14336,1,2").key == tuned.ShapeKey(4096, 8, 2, 7168)
    for bad in ("4096,8,2", "a,b,c,d", "4096,8,2,14336,3", "64,4,8,32"):
        with pytest.raises(ValueError):
            parse_shape(bad)


def test_block_sizes_follow_the_rows_per_expert():
    assert space.block_ms(0.06, 16) == [16]  # decode: one block per expert
    assert space.block_ms(4, 16) == [16]  # Qwen3 T=64: 4 rows, no larger block
    # Mixtral T=256: 64 rows on average; about half the experts hold more, so 128 is tried too
    assert space.block_ms(64, 32) == [64, 32, 128, 16]
    assert space.block_ms(256, 128) == [128, 64, 32]
    heur = heuristic_config(64, 8, 128, 1)
    gus = space.gate_up_tiles(heur, 16)
    assert gus[0] == heur and len(set(gus)) == len(gus)
    dns = space.down_tiles(gus[1])
    assert dns[0] == gus[1] and {d.block_n for d in dns} == {gus[1].block_n}


def test_lora_candidates_start_from_the_base_winner():
    heur = heuristic_config(64, 8, 128, 8)
    base = dataclasses.replace(heur, block_n=128, num_warps=8)
    cands = space.lora_candidates(base, heur, rows_per_expert=4.0, adapters=8, inter=768)
    assert cands[0] == heur and cands[1] == space.with_lora_fields(base, heur)
    assert any(c.fuse_shrink and c.fuse_down_shrink for c in cands)
    assert any(c.shrink_split_k > 1 for c in cands)  # decode sizes
    big = space.lora_candidates(base, heur, rows_per_expert=2048.0, adapters=8, inter=14336)
    assert not any(c.fuse_shrink or c.fuse_down_shrink or c.shrink_split_k > 1 for c in big)
    assert all(c.check() for c in cands + big)


def test_round_two_merges_the_best_value_of_each_switch():
    start = MoEConfig()
    a = dataclasses.replace(start, lora_runs=4)
    b = dataclasses.replace(start, shrink_split_k=4)
    c = dataclasses.replace(start, shrink_split_k=2)
    got = space.merged(start, [(start, 1.0), (a, 0.8), (b, 0.7), (c, 0.9)])
    assert got == dataclasses.replace(start, lora_runs=4, shrink_split_k=4)
    assert space.merged(start, [(start, 1.0), (a, 0.8)]) is None  # nothing new to time


class FakePool:
    """What the compile workers report, chosen by the test."""

    def __init__(self, fail=(), pending=()):
        self.fail, self.pending, self.asked = fail, pending, []

    def submit(self, problem, cfg):
        pass

    def result(self, problem, cfg, timeout):
        self.asked.append(cfg)
        if cfg in self.fail:
            return "OutOfResources: out of resource: shared memory, Required: 262144"
        return PENDING if cfg in self.pending else None


def test_tuner_checks_before_timing_and_records_failures(monkeypatch):
    monkeypatch.setattr(space, "TILES", SMALL_TILES)
    p_base = Problem(TINY, 6, dtype="float16")
    p_lora = Problem(TINY, 6, 16, adapters=4, dtype="float16")
    heur = heuristic_config(6, 2, 4, 1)
    oom = dataclasses.replace(heur, block_n=16, block_k=16, num_warps=4, num_stages=1)
    wrong = dataclasses.replace(heur, block_n=32, block_k=16, num_warps=4, num_stages=2)
    run = search.run_layer

    def run_layer(inp, cfg):  # a kernel bug at one tile size: the check must catch it
        y = run(inp, cfg)
        return y * 1.5 if cfg == wrong else y

    monkeypatch.setattr(search, "run_layer", run_layer)
    timed = []
    timer = WallTimer()
    tuner = search.Tuner([p_base], [p_lora], device="cpu", pool=FakePool(fail=[oom]),
                         timer=lambda fn, est: timed.append(1) or timer(fn, est),
                         budget_s=120, progress=False)
    outcomes, skipped = tuner.run()
    reasons = {(s.config, s.reason.split(":")[0]) for s in skipped}
    assert (oom, "OutOfResources") in reasons
    assert any(c == wrong and r.startswith("differs from the reference") for c, r in reasons)
    assert len(timed) == tuner.timed and tuner.timed > 3
    by = {o.problem: o for o in outcomes}
    assert set(by) == {p_base, p_lora}
    assert by[p_base].config not in (oom, wrong) and by[p_base].default_ms < math.inf
    for p, o in by.items():  # every written config is right (checked again here)
        inp = make_inputs(p, "cpu")
        ref = reference_rows(inp, sample=1000)
        assert ref.error(fused_moe_lora(**inp, config=o.config)) < 2e-2


def test_budget_stops_the_search_with_the_default_measured(monkeypatch):
    """A clock that moves 1 s per timing and a 6 s budget: the default and a few neighbours
    are measured, not the whole list; a candidate still compiling is not a failure."""
    monkeypatch.setattr(space, "TILES", SMALL_TILES)
    now = [0.0]
    p = Problem(TINY, 6, dtype="float16")

    def timer(fn, est):
        fn()
        now[0] += 1.0
        return 1.0 + now[0] * 1e-3  # later candidates look slower: the default stays best

    heur = heuristic_config(6, 2, 4, 1)
    late = space.gate_up_tiles(heur, 16)[1]
    tuner = search.Tuner([p], [], device="cpu", pool=FakePool(pending=[late]), timer=timer,
                         budget_s=6, clock=lambda: now[0], progress=False)
    outcomes, skipped = tuner.run()
    assert [o.config for o in outcomes] == [heur] and outcomes[0].tried <= 6
    assert not skipped  # PENDING is out of time, not a failure
    assert late in tuner.pool.asked


@pytest.mark.usefixtures("e4m3_cast")  # the CPU CLI fixes the interpreter's cast; undone here
def test_written_file_is_read_back_by_pick_config(tmp_path, monkeypatch):
    """The CLI end to end on the interpreter: --device cpu writes a file for device "cpu";
    pick_config answers from it; a second run merges; a file of another device is refused."""
    monkeypatch.setattr(space, "TILES", SMALL_TILES)
    out = tmp_path / "cpu.json"
    args = ["tune-kernels", "--shape", "32,4,2,24", "--tokens", "4", "--device", "cpu",
            "--dtype", "float16", "--budget-s", "40", "--quiet", "--out", str(out)]
    assert cli(args) == 0
    assert cli(args[:4] + ["16"] + args[5:]) == 0
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 2 and data["device"] == "cpu"
    entries = data["shapes"]["32,4,2,24"]["float16"]["base"]
    assert set(entries) == {"4", "16"}
    monkeypatch.setenv(tuned.ENV_VAR, str(out))
    tuned.reload()
    try:
        got = pick_config(4, 2, 4, 1, hidden=32, inter=24, dtype="float16", device_name="cpu")
        assert got == MoEConfig.from_dict(entries["4"]["config"])
        assert pick_config(16, 2, 4, 1, hidden=32, inter=24, dtype="float16",
                           device_name="cpu") == MoEConfig.from_dict(entries["16"]["config"])
    finally:
        monkeypatch.delenv(tuned.ENV_VAR)
        tuned.reload()
    data["device"] = "Other GPU"
    out.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Other GPU"):
        output.load_previous(out, "cpu")


@pytest.mark.parametrize("argv, needle", [
    (["--shape", "4096,8"], "--shape '4096,8'"),
    (["--shape", "olmoe", "--tokens", "0,4"], "--tokens"),
    (["--shape", "olmoe", "--ranks", "16,x"], "--ranks"),
    (["--shape", "olmoe", "--budget-s", "0"], "--budget-s"),
    (["--shape", "olmoe", "--device", "cuda"], "no CUDA device"),
], ids=["shape", "tokens", "ranks", "budget", "no_gpu"])
def test_bad_options_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = cli(["tune-kernels", *argv, "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and "\n" not in err and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_experts", "fp8_experts"])
def test_compile_pool_workers_run_candidates_and_report_errors(fp8):
    """Spawned workers (here on the CPU, interpreter) run a candidate once and say whether it
    ran; a launch error comes back as its one-line message. FP8 problems: the worker builds
    the inputs uninitialized (e4m3 values, fp32 scales) and runs the FP8 kernels."""
    p = Problem(TINY, 4, 16, adapters=2, dtype="float16", fp8=fp8)
    good = heuristic_config(4, 2, 4, 8)
    good = space.for_fp8(good) if fp8 else good
    bad = dataclasses.replace(good, lora_runs=3)  # refused by the launcher
    pool = CompilePool(1, "cpu")
    try:
        pool.submit(p, good)
        pool.submit(p, bad)
        assert pool.result(p, good, timeout=120) is None
        assert "power of two" in pool.result(p, bad, timeout=120)
    finally:
        pool.close()


def test_inputs_route_like_a_serving_batch():
    ds = Problem(parse_shape("256,64,8,32,8"), 64, 16, dtype="float16")  # 8 local experts
    inp = make_inputs(ds, "cpu")
    ids = inp["topk_ids_TK"]
    assert ids.max() < 8 and (ids == -1).float().mean() > 0.7  # 7/8 of pairs elsewhere
    assert rows_per_expert(inp) == pytest.approx(float((ids >= 0).sum()) / 8)
    assert inp["slot_enabled_S"].sum() == 8 and inp["num_lora_tokens"] == 64
    ref = reference_rows(inp, sample=3)
    r = ref.rows
    assert r.tolist()[:1] == [0] and 63 in r.tolist() and len(r) == 3
    want = experts_reference(inp["x_TH"][r], inp["w_gate_up_EXH"], inp["w_down_EHI"],
                             inp["topk_weights_TK"][r], ids[r], inp["token_slot_T"][r],
                             inp["lora"])
    torch.testing.assert_close(ref.want, want)


def test_compile_only_mode_launches_nothing():
    """In a compile worker every Triton launch compiles (on a GPU: and loads) its kernel but
    runs nothing, so the workers take no GPU time from the timings. Checked in a fresh process
    (the switch is for the whole process) on the interpreter's launcher: the output of a launch
    stays as it was."""
    import subprocess
    import sys

    code = """
import torch
from moelora_dist.kernels.moe_gemm import ops
from moelora_dist.tuning.compile_pool import _compile_only
out = torch.ones(3, 2, 8)
ids = torch.zeros(3, 2, dtype=torch.int32)
ran = ops.topk_sum(out.view(6, 8), ids, 4).clone()
_compile_only()
y = torch.full((3, 8), -7.0)
from moelora_dist.kernels.moe_gemm.kernel_down import _topk_sum_kernel
_topk_sum_kernel[(3, 1)](out.view(6, 8), ids, y, 8, 2, 4, y.stride(0), BLOCK_H=8)
assert torch.equal(ran, torch.full((3, 8), 2.0)) and torch.equal(y, torch.full((3, 8), -7.0))
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_base_winner_is_tried_in_every_program_order(monkeypatch):
    """The base phase times its winner again with each ``group_m`` of ``space.GROUP_MS`` and
    keeps the fastest (a timer that makes group 16 the fastest picks it; with the sweep gone
    the winner keeps the heuristic's order and this fails)."""
    monkeypatch.setattr(space, "TILES", SMALL_TILES)
    p = Problem(TINY, 6, dtype="float16")
    seen = []

    def timer(fn, est):
        fn()
        cfg = seen[-1]
        return 1.0 - (0.5 if cfg.group_m == 16 else 0.0)

    real = search.run_layer

    def run_layer(inp, cfg):
        seen.append(cfg)
        return real(inp, cfg)

    monkeypatch.setattr(search, "run_layer", run_layer)
    tuner = search.Tuner([p], [], device="cpu", pool=FakePool(), timer=timer, budget_s=600,
                         progress=False)
    outcomes, _ = tuner.run()
    assert outcomes[0].config.group_m == 16
    assert {c.group_m for c in seen} >= set(space.GROUP_MS)


class SlowPool(FakePool):
    """Workers compile in parallel: a candidate is ready ``need`` seconds of the fake clock
    after it was submitted; a wait for it moves the clock to then, or by its whole timeout
    (PENDING) when that is too short."""

    def __init__(self, need, clock):
        super().__init__()
        self.need, self.clock, self.ready = need, clock, {}

    def submit(self, problem, cfg):
        self.ready.setdefault((problem, cfg), self.clock[0] + self.need)

    def result(self, problem, cfg, timeout):
        self.asked.append(cfg)
        self.submit(problem, cfg)
        ready = self.ready[(problem, cfg)]
        if self.clock[0] + timeout < ready:
            self.clock[0] += timeout
            return PENDING
        self.clock[0] = max(self.clock[0], ready)
        return None


def test_first_problems_wait_for_their_default_to_compile(monkeypatch):
    """Three problems share a 12 s phase (4 s each); every compile, all submitted at the
    phase's start, takes 6 s. Each default still waits for its compile (up to DEFAULT_WAIT_S,
    within the phase), so every problem gets an entry; bounded by its share alone, the first
    got none (the H200 run of 2026-12-04 wrote no Qwen3 T=1 base entry so)."""
    monkeypatch.setattr(space, "TILES", SMALL_TILES)
    now = [0.0]
    probs = [Problem(TINY, t, dtype="float16") for t in (2, 6, 12)]

    def timer(fn, est):
        fn()
        now[0] += 0.01
        return 1.0

    tuner = search.Tuner(probs, [], device="cpu", pool=SlowPool(6.0, now), timer=timer,
                         budget_s=12, clock=lambda: now[0], progress=False)
    outcomes, _ = tuner.run()
    assert {o.problem for o in outcomes} == set(probs)


@pytest.mark.parametrize("fastest", [64, None], ids=["order_64_wins", "stored_wins"])
def test_refine_times_the_stored_entry_in_every_program_order(monkeypatch, fastest):
    """``--refine-order``: the stored config is timed in this run, then with each group_m;
    the fastest is kept (the stored one when no order beats it), no other candidate is
    tried, and the entry's recorded default_ms is carried over."""
    p = Problem(TINY, 6, dtype="float16")
    stored = dataclasses.replace(heuristic_config(6, 2, 4, 1), group_m=1)
    seen = []

    def timer(fn, est):
        fn()
        return 0.5 if seen[-1].group_m == fastest else 1.0

    real = search.run_layer
    monkeypatch.setattr(search, "run_layer", lambda inp, cfg: seen.append(cfg) or real(inp, cfg))
    tuner = search.Tuner([p], [], device="cpu", pool=FakePool(), timer=timer, budget_s=600,
                         progress=False, refine={p: (stored, 2.5)})
    outcomes, skipped = tuner.run()
    assert not skipped and len(outcomes) == 1
    o = outcomes[0]
    assert o.config == (dataclasses.replace(stored, group_m=fastest) if fastest else stored)
    assert o.default_ms == 2.5 and o.ms == (0.5 if fastest else 1.0)
    assert {dataclasses.replace(c, group_m=1) for c in seen} == {stored}  # nothing else
    assert {c.group_m for c in seen} == set(space.GROUP_MS)


@pytest.mark.usefixtures("e4m3_cast")
def test_refine_order_cli(tmp_path, monkeypatch, capsys):
    """The CLI on the interpreter: a tuning run, then --refine-order over it (and a token
    count the file lacks, left out); bad combinations are one line and exit 2."""
    monkeypatch.setattr(space, "TILES", SMALL_TILES)
    out = tmp_path / "cpu.json"
    base = ["tune-kernels", "--shape", "32,4,2,24", "--device", "cpu", "--dtype", "float16",
            "--quiet", "--out", str(out)]
    assert cli(base + ["--tokens", "4", "--budget-s", "40"]) == 0
    assert cli(base + ["--tokens", "4,16", "--budget-s", "30", "--refine-order"]) == 0
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 2 and data["runs"][1]["refine_order"] is True
    assert set(data["shapes"]["32,4,2,24"]["float16"]["base"]) == {"4"}  # 16: no entry
    MoEConfig.from_dict(data["shapes"]["32,4,2,24"]["float16"]["base"]["4"]["config"])
    capsys.readouterr()
    assert cli(base + ["--tokens", "4", "--refine-order", "--keep-faster"]) == 2
    assert "drop --keep-faster" in capsys.readouterr().err
    assert cli(base[:-1] + [str(tmp_path / "none.json"), "--tokens", "4",
                            "--refine-order"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(base + ["--tokens", "64", "--refine-order"]) == 2
    assert "no entry for any" in capsys.readouterr().err


def test_keep_faster_times_the_stored_entry_in_the_same_run(monkeypatch):
    """``--keep-faster``: the entry --out has is one more candidate (base and LoRA). A timer
    that makes it the fastest keeps it; the outcome says it was timed, so ``faster_only``
    keeps a faster config of this run even against a lower recorded time (another run's)."""
    monkeypatch.setattr(space, "TILES", SMALL_TILES)
    p_base = Problem(TINY, 6, dtype="float16")
    p_lora = Problem(TINY, 6, 16, adapters=4, dtype="float16")
    heur = heuristic_config(6, 2, 4, 1)
    stored = {p: dataclasses.replace(heur, block_n=32, block_k=16, num_warps=2, num_stages=1,
                                     group_m=8) for p in (p_base, p_lora)}
    seen = []

    def timer(fn, est):
        fn()
        return 0.25 if seen[-1] in stored.values() else 1.0

    real = search.run_layer
    monkeypatch.setattr(search, "run_layer", lambda inp, cfg: seen.append(cfg) or real(inp, cfg))
    tuner = search.Tuner([p_base], [p_lora], device="cpu", pool=FakePool(), timer=timer,
                         budget_s=600, progress=False, stored=stored)
    outcomes, _ = tuner.run()
    by = {o.problem: o for o in outcomes}
    for p in (p_base, p_lora):
        assert by[p].config == stored[p] and by[p].stored_timed and by[p].ms == 0.25
    # a faster config of this run against a recorded 0.01 ms (another run, another tree)
    previous = {"shapes": {str(TINY.key): {"float16": {
        "base": {"6": {"config": heur.to_dict(), "ms": 0.01}},
        "lora_r16": {"6": {"config": heur.to_dict(), "ms": 0.01}}}}}}
    kept, dropped = output.faster_only(outcomes, previous)
    assert len(kept) == 2 and dropped == 0
    untimed = [dataclasses.replace(o, stored_timed=False) for o in outcomes]
    assert output.faster_only(untimed, previous) == ([], 2)  # untimed: the recorded time rules
