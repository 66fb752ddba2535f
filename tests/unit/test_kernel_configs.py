"""pick_config: tuned files first (device, shape, dtype, nearest token count and rank tile),
the heuristic where none matches; MoEConfig's checks; the shipped files parse."""

import dataclasses
import json

import pytest

from moelora_dist.errors import FileError, OptionError
from moelora_dist.kernels.moe_lora import tuned
from moelora_dist.kernels.moe_lora.configs import (LORA_FIELDS, MoEConfig, config_and_source,
                                                   heuristic_config, pick_config)

DEV = "Fake GPU 9000"
QWEN = dict(hidden=2048, inter=768)  # E_l 128, K 8


def _entry(**kw):
    return {"config": dataclasses.asdict(MoEConfig(**kw)), "ms": 0.1, "default_ms": 0.2}


def _file(tmp_path, shapes, device=DEV, name="tuned.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"format": 1, "device": device, "runs": [], "shapes": shapes,
                                "skipped": []}))
    return path


@pytest.fixture
def use_files(monkeypatch):
    """Point $MOELORA_KERNEL_CONFIGS at the given files for one test, then forget them."""
    def use(*paths):
        monkeypatch.setenv(tuned.ENV_VAR, ":".join(str(p) for p in paths))
        tuned.reload()
    yield use
    monkeypatch.delenv(tuned.ENV_VAR, raising=False)
    tuned.reload()


def _qwen_file(tmp_path):
    return _file(tmp_path, {"2048,128,8,768": {"name": "qwen3", "bfloat16": {
        "base": {"1": _entry(block_m=16, block_n=32), "64": _entry(block_m=16, block_n=256),
                 "4096": _entry(block_m=128, block_n=64, num_warps=8)},
        "lora_r16": {"64": _entry(block_m=32, fuse_shrink=True, lora_runs=4)},
        "lora_r64": {"64": _entry(block_m=64, shrink_split_k=4)}}}})


def test_tuned_entry_of_the_nearest_token_count(tmp_path, use_files):
    use_files(_qwen_file(tmp_path))
    pick = lambda T: pick_config(T, 8, 128, 8, **QWEN, dtype="bfloat16", device_name=DEV)
    assert pick(1).block_n == 32
    assert pick(7).block_n == 32  # in log2, 8 is the midpoint of 1 and 64
    assert pick(8).block_n == 256  # a tie goes to the larger
    assert pick(64).block_n == 256 and pick(511).block_n == 256
    assert pick(512).block_n == 64  # the midpoint of 64 and 4096: the larger again
    assert pick(100000).num_warps == 8


def test_lora_call_takes_its_rank_tile_or_the_next_larger_one(tmp_path, use_files):
    """Tiles tuned at one rank tile fit the smaller ones only: rank 64 on r16 tiles asked the
    H200 for 288 KiB of shared memory (a crash of the kernel benchmark, 2026-12-02). Above
    every tuned rank tile, the heuristic (rank-independent tiles, tested up to rank 128)."""
    use_files(_qwen_file(tmp_path))
    pick = lambda r: pick_config(64, 8, 128, 8, **QWEN, lora_rank=r, dtype="bfloat16",
                                 device_name=DEV)
    assert pick(16).fuse_shrink and pick(16).lora_runs == 4
    assert pick(64).shrink_split_k == 4
    assert pick(32).shrink_split_k == 4  # the next larger tuned tile, 64
    assert pick(128) == heuristic_config(64, 8, 128, 8)  # none larger: never r64's tiles
    assert config_and_source(64, 8, 128, 8, **QWEN, lora_rank=128, dtype="bfloat16",
                             device_name=DEV)[1] == "heuristic"
    only_r16 = _file(tmp_path, {"2048,128,8,768": {"bfloat16": {
        "base": {"64": _entry(block_m=16, block_n=256)},
        "lora_r16": {"64": _entry(block_m=32, fuse_shrink=True, lora_runs=4)}}}}, name="r16.json")
    use_files(only_r16)
    assert pick(64) == heuristic_config(64, 8, 128, 8)  # not r16's tiles, not r16's base


def test_base_only_tuned_shape_keeps_tuned_tiles_with_heuristic_lora(tmp_path, use_files):
    use_files(_file(tmp_path, {"4096,8,2,14336": {"bfloat16": {
        "base": {"64": _entry(block_m=64, block_n=256, down_block_k=256)}}}}))
    cfg = pick_config(64, 2, 8, 8, hidden=4096, inter=14336, lora_rank=16, dtype="bfloat16",
                      device_name=DEV)
    heur = heuristic_config(64, 2, 8, 8)
    assert (cfg.block_m, cfg.block_n, cfg.down_block_k) == (64, 256, 256)
    assert all(getattr(cfg, f) == getattr(heur, f) for f in LORA_FIELDS)


@pytest.mark.parametrize("miss", [
    dict(device_name="Other GPU"), dict(dtype="float16"), dict(hidden=4096),
    dict(device_name=None),  # CPU tensors: the interpreter runs the heuristic's tiles
], ids=["other_device", "other_dtype", "other_shape", "no_device"])
def test_heuristic_where_no_file_matches(tmp_path, use_files, miss):
    use_files(_qwen_file(tmp_path))
    kw = dict(QWEN, dtype="bfloat16", device_name=DEV)
    kw.update(miss)
    assert pick_config(64, 8, 128, 8, **kw) == heuristic_config(64, 8, 128, 8)
    assert pick_config(64, 8, 128, 8, **{**kw, "lora_rank": 16}) == heuristic_config(
        64, 8, 128, 8)


def test_later_files_win_per_token_count(tmp_path, use_files):
    a = _qwen_file(tmp_path)
    b = _file(tmp_path, {"2048,128,8,768": {"bfloat16": {
        "base": {"64": _entry(block_m=32, block_n=16)}}}}, name="mine.json")
    use_files(a, b)
    pick = lambda T: pick_config(T, 8, 128, 8, **QWEN, dtype="bfloat16", device_name=DEV)
    assert pick(64).block_n == 16 and pick(1).block_n == 32


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(format=7), "format 7"),
    (lambda d: d.pop("device"), "no 'device'"),
    (lambda d: d["shapes"].update({"2048,x": {}}), "four positive integers"),
    (lambda d: d["shapes"]["2048,128,8,768"]["bfloat16"].update(lora16={}), "unknown mode"),
    (lambda d: d["shapes"]["2048,128,8,768"]["bfloat16"]["base"]["1"]["config"].update(
        block_q=3), "unknown field.*block_q"),
    (lambda d: d["shapes"]["2048,128,8,768"]["bfloat16"]["base"]["1"]["config"].update(
        block_n=48), "block_n=48 must be a power of two"),
], ids=["format", "device", "shape_key", "mode", "unknown_field", "bad_value"])
def test_broken_file_is_one_line_naming_it(tmp_path, use_files, mutate, needle):
    data = json.loads(_qwen_file(tmp_path).read_text())
    mutate(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    use_files(path)
    with pytest.raises(FileError, match=needle) as exc:
        pick_config(64, 8, 128, 8, **QWEN, dtype="bfloat16", device_name=DEV)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_missing_path_in_the_variable_is_named(tmp_path, use_files):
    use_files(tmp_path / "nope.json")
    with pytest.raises(FileError, match="nope.json"):
        pick_config(64, 8, 128, 8, **QWEN, dtype="bfloat16", device_name=DEV)


@pytest.mark.parametrize("field, value, needle", [
    ("block_m", 8, "power of two >= 16"), ("num_warps", 3, "1, 2, 4, 8 or 16"),
    ("num_stages", 0, ">= 1"), ("lora_runs", 3, "power of two"),
    ("down_shrink_runs", 3, "-1"), ("shrink_split_k", 0, ">= 1"),
    ("down_shrink_split_k", 0, ">= 1"), ("lora_prefetch", 1, "true, false or null"),
])
def test_config_check_names_the_field(field, value, needle):
    with pytest.raises(OptionError, match=f"{field}={value}.*{needle}"):
        dataclasses.replace(MoEConfig(), **{field: value}).check()


def test_contradictory_switches_are_refused():
    with pytest.raises(OptionError, match="run_loop"):
        MoEConfig(fuse_shrink=True, run_loop=False).check()
    with pytest.raises(OptionError, match="shrink_split_k"):
        MoEConfig(fuse_shrink=True, shrink_split_k=2).check()
    with pytest.raises(OptionError, match="down_shrink_split_k"):
        MoEConfig(fuse_down_shrink=True, down_shrink_split_k=2).check()
    assert MoEConfig.from_dict(MoEConfig().to_dict()) == MoEConfig()


def test_shipped_files_parse_and_are_named_for_their_device():
    for path in sorted(tuned.PACKAGE_DIR.glob("*.json")):
        parsed = tuned.parse_file(path)
        devices = {key[0] for key in parsed}
        assert devices and all(tuned.file_name(d) == path.name for d in devices), path
