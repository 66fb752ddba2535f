"""benchmarks/device/override_configs.py: shipped entries with fields set, checked like a
shipped file; a contradictory setting is one line and exit 2."""

import json

from benchmarks.device.override_configs import main
from moelora_dist.kernels.moe_lora import tuned


def test_fields_are_set_on_the_chosen_entries_only(tmp_path):
    out = tmp_path / "o.json"
    assert main(["--set", "lora_prefetch=false", "--max-tokens", "64", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    entries = [(t, e["config"]) for s in data["shapes"].values() for dt, m in s.items()
               if dt != "name" for mode, es in m.items() for t, e in es.items()]
    assert entries and all(int(t) <= 64 and c["lora_prefetch"] is False for t, c in entries)
    assert tuned.parse_file(out)


def test_contradiction_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main(["--set", "fuse_down_shrink=true", "--set", "down_shrink_split_k=2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "contradicts every chosen entry" in err


def test_entries_the_setting_contradicts_are_left_out(tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main(["--set", "down_shrink_split_k=3", "--out", str(out)]) == 0
    assert "left out" in capsys.readouterr().out
    for s in json.loads(out.read_text())["shapes"].values():
        for dt, modes in s.items():
            for es in (modes.values() if dt != "name" else ()):
                assert all(not e["config"]["fuse_down_shrink"] for e in es.values())
    assert main(["--set", "lora_prefetch", "--out", str(out)]) == 2


def test_with_constants_sets_them_then_runs_the_module(tmp_path, monkeypatch):
    """benchmarks/device/with_constants.py: the constant is set before the module runs; a
    missing name is one line, exit 2, and runs nothing."""
    import pytest

    from benchmarks.device import with_constants
    from moelora_dist.kernels.align import ops

    script = tmp_path / "probe_mod.py"
    out = tmp_path / "seen.txt"
    script.write_text("import sys\nfrom moelora_dist.kernels.align import ops\n"
                      "open(sys.argv[1], 'w').write(str(ops.SINGLE_LAUNCH_MAX_ITEMS))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ops, "SINGLE_LAUNCH_MAX_ITEMS", ops.SINGLE_LAUNCH_MAX_ITEMS)  # restored
    with_constants.main(["--set", "moelora_dist.kernels.align.ops:SINGLE_LAUNCH_MAX_ITEMS=3",
                         "--", "probe_mod", str(out)])
    assert out.read_text() == "3"
    with pytest.raises(SystemExit) as e:
        with_constants.main(["--set", "moelora_dist.kernels.align.ops:NO_SUCH=1", "--",
                             "probe_mod", str(out)])
    assert e.value.code == 2


def test_with_constants_refuses_a_value_that_is_not_json(capsys):
    """``False`` (Python) instead of ``false`` (JSON): one line naming it, exit 2."""
    import pytest

    from benchmarks.device import with_constants

    with pytest.raises(SystemExit) as e:
        with_constants.main(["--set", "moelora_dist.engine.engine:ASYNC_STEPS=False", "--",
                             "probe_mod"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'False' is not JSON" in err[0]
