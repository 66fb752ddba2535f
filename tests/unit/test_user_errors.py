"""Every class of bad input a user can give: one line naming the problem and the fix, exit
code 2, before any heavy work, and nothing else disturbed.

Each test drives the public CLI (``moelora-dist ...`` in process) or the Python API the way a
hostile user would, and checks the exit code, that stderr is exactly one line, and what the
line names. Where the check must come before the model loads, loading the model is made to
fail the test if it is reached.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

import moelora_dist.models.model as model_mod
from moelora_dist.engine.engine import Engine
from moelora_dist.adapters import AdapterError, load_adapter
from moelora_dist.cli.main import main as cli_main
from moelora_dist.errors import FileError, MoeloraError
from moelora_dist.files import paths
from tests.hf_factory import lora_config_dict, make_model, save_model, write_adapter

P = "base_model.model.model.layers"
E, H, I, r = 4, 32, 24, 4


def _stacked(scale=1.0):
    g = torch.Generator().manual_seed(0)
    t = {}
    for name, din, dout in (("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H)):
        t[f"{P}.0.mlp.experts.{name}.lora_A.weight"] = torch.randn(E, r, din, generator=g) * 0.1
        t[f"{P}.0.mlp.experts.{name}.lora_B.weight"] = torch.randn(E, dout, r, generator=g) * scale
    return t


def _adapter(path, tensors=None, **cfg):
    return write_adapter(path, _stacked() if tensors is None else tensors,
                         lora_config_dict(**{"r": r, "alpha": 8, **cfg}))


def _one_line(capsys, *needles, prog="moelora-dist"):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}"), err[0]
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(make_model("mixtral"), tmp_path_factory.mktemp("m"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: the checks under test must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(model_mod.MoELoRAModel, "build", refuse)


def _job(tmp_path, model_dir, lines, *extra, command="logits", adapters=(), out=None):
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(lines) + "\n")
    argv = [command, "--model", str(model_dir), "--requests", str(req),
            "--out", str(out or tmp_path / "out.bin"), "--device", "cpu"]
    for a in adapters:
        argv += ["--adapter", a]
    return cli_main(argv + list(extra))


# -- adapter values: scales and factors that would poison activations -------------------------

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.mark.parametrize("field,value,needle,file", [
    ("lora_alpha", math.nan, "lora_alpha=nan; it must be finite", CONFIG),
    ("lora_alpha", math.inf, "lora_alpha=inf; it must be finite", CONFIG),
    ("lora_alpha", 1e300, "lora_alpha is wrong", WEIGHTS),  # finite, but the delta is not
    ("alpha_pattern", {"gate_proj": math.nan}, "alpha_pattern['gate_proj']=nan", CONFIG),
    ("lora_alpha", None, "lora_alpha=None; it must be a number", CONFIG),
    ("lora_alpha", "8", "lora_alpha='8'; it must be a number", CONFIG),
    ("rank_pattern", {"(gate": 4}, "rank_pattern key '(gate' is not a valid regular expression",
     CONFIG),
])
def test_bad_scales_and_config_values_are_refused(tmp_path, capsys, field, value, needle, file):
    d = tmp_path / "a"
    _adapter(d)
    cfg = json.loads((d / CONFIG).read_text())
    cfg[field] = value
    (d / CONFIG).write_text(json.dumps(cfg))
    assert cli_main(["inspect-adapter", str(d)]) == 2
    _one_line(capsys, needle, file)


def test_huge_finite_factors_are_refused(tmp_path, capsys):
    _adapter(tmp_path / "a", _stacked(scale=3e38 / 4))
    assert cli_main(["inspect-adapter", str(tmp_path / "a")]) == 2
    _one_line(capsys, "may reach", "must stay below 1024")


def test_a_real_sized_adapter_passes_the_delta_bound(tmp_path):
    """The bound refuses corrupt files only: rank 64, rsLoRA alpha 128, factors at PEFT's
    init scale and trained-size B load."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for name, din, dout in (("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H)):
        t[f"{P}.0.mlp.experts.{name}.lora_A.weight"] = (torch.rand(E, 64, din, generator=g) - .5) \
            * 2 / din ** 0.5
        t[f"{P}.0.mlp.experts.{name}.lora_B.weight"] = torch.randn(E, dout, 64, generator=g) * 0.05
    write_adapter(tmp_path, t, lora_config_dict(r=64, alpha=128, use_rslora=True))
    a = load_adapter(tmp_path)
    assert a.values_checked and all(f.delta_bound < 1024 for _, _, f in a.factors())


# -- files: corrupt, unreadable, misleading ------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_adapter_weights_are_one_line(tmp_path, capsys, damage):
    d = _adapter(tmp_path / "a")
    f = d / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                   "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"}[damage])
    assert cli_main(["inspect-adapter", str(d)]) == 2
    _one_line(capsys, str(f), "corrupt or truncated")


@pytest.mark.parametrize("body,needle", [
    ("[1, 2]", "expected a JSON object, found a JSON list"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ("{not json", "not valid JSON"),
])
def test_bad_adapter_config_json(tmp_path, capsys, body, needle):
    d = _adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text(body)
    assert cli_main(["inspect-adapter", str(d)]) == 2
    _one_line(capsys, needle, "adapter_config.json")


def test_permission_denied_is_not_reported_as_missing(tmp_path, monkeypatch):
    """As root a chmod cannot make a file unreadable, so the OS error is injected where every
    file is opened; the message must say permission, not "no such file"."""
    d = _adapter(tmp_path / "a")
    real_open = open

    def denied(path, *a, **k):
        if str(path).endswith("adapter_config.json"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(AdapterError, match="adapter_config.json: permission denied"):
        load_adapter(d)
    assert paths.describe_os_error(PermissionError(13, "x")) == "permission denied"


def test_symlink_loop_dir_named_weights_and_sharded_adapter(tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(AdapterError, match="symbolic link loop"):
        load_adapter(loop)
    d = tmp_path / "dirweights"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(lora_config_dict()))
    (d / "adapter_model.safetensors").mkdir()
    with pytest.raises(AdapterError, match="adapter_model.safetensors: is a directory"):
        load_adapter(d)
    s = tmp_path / "sharded"
    s.mkdir()
    (s / "adapter_config.json").write_text(json.dumps(lora_config_dict()))
    save_file(_stacked(), str(s / "adapter_model-00001-of-00002.safetensors"))
    with pytest.raises(AdapterError, match="a sharded adapter .* is not supported"):
        load_adapter(s)


def test_int32_adapter_is_refused_at_inspect(tmp_path, capsys):
    t = {k: (v * 100).to(torch.int32) for k, v in _stacked().items()}
    _adapter(tmp_path / "a", t)
    assert cli_main(["inspect-adapter", str(tmp_path / "a")]) == 2
    _one_line(capsys, "dtype torch.int32", "floating point")


def test_rank_hint_names_the_real_option(tmp_path, capsys):
    _adapter(tmp_path / "a")
    assert cli_main(["inspect-adapter", str(tmp_path / "a"), "--max-rank", "2"]) == 2
    line = _one_line(capsys, "--max-rank")
    assert "max_lora_rank" not in line


# -- model jobs: everything checked before the model loads ---------------------------------------

@pytest.mark.parametrize("lines,needle", [
    (['{"input_ids": [5], "adaptor": "a"}'], "unknown key(s) ['adaptor']"),
    (['{"input_ids": [5, 999]}'], "outside the vocabulary"),
    (['{"input_ids": [5], "adapter": "nope"}'], "unknown adapter 'nope'"),
    (['not json'], "not valid JSON"),
])
def test_bad_requests_are_refused_before_the_model_loads(tmp_path, capsys, model_dir,
                                                         no_model_load, lines, needle):
    assert _job(tmp_path, model_dir, lines) == 2
    _one_line(capsys, needle)


@pytest.mark.parametrize("flag", ["--max-loras", "--max-batch-tokens", "--max-rank", "--tp"])
def test_zero_options_are_refused(tmp_path, capsys, model_dir, no_model_load, flag):
    assert _job(tmp_path, model_dir, ['{"input_ids": [5]}'], flag, "0") == 2
    _one_line(capsys, f"{flag} 0: must be at least 1")


def test_zero_max_batch_is_refused(tmp_path, capsys, model_dir, no_model_load):
    assert _job(tmp_path, model_dir, ['{"input_ids": [5], "max_new_tokens": 2}'],
                "--max-batch", "0", command="generate") == 2
    _one_line(capsys, "--max-batch 0: must be at least 1")


def test_requests_path_that_is_a_directory(tmp_path, capsys, model_dir, no_model_load):
    rc = cli_main(["logits", "--model", str(model_dir), "--requests", str(tmp_path),
                   "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 2
    _one_line(capsys, "request file", "is a directory")


@pytest.mark.parametrize("out", ["missing_dir/out.bin", "."], ids=["no_dir", "a_directory"])
def test_unwritable_out_is_refused_before_any_compute(tmp_path, capsys, model_dir,
                                                      no_model_load, out):
    assert _job(tmp_path, model_dir, ['{"input_ids": [5]}'], out=tmp_path / out) == 2
    _one_line(capsys, "--out")


def test_bad_adapter_config_is_refused_before_the_model_loads(tmp_path, capsys, model_dir,
                                                              no_model_load):
    d = _adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text("[]")
    assert _job(tmp_path, model_dir, ['{"input_ids": [5]}'], adapters=[f"a={d}"]) == 2
    _one_line(capsys, "adapter_config.json", "expected a JSON object")


def test_corrupt_model_shard_is_one_line(tmp_path, capsys):
    m = save_model(make_model("mixtral"), tmp_path / "m")
    capsys.readouterr()  # transformers' own progress output
    shard = m / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert _job(tmp_path, m, ['{"input_ids": [5]}']) == 2
    _one_line(capsys, "model.safetensors", "corrupt or truncated")


# -- checkpoints the loader cannot serve as they are ----------------------------------------------

def test_quantized_checkpoint_is_refused(tmp_path, capsys):
    # Fine-grained FP8 is served since issue 15 (tests/unit/test_fp8_config.py refuses its
    # variants); any other quantization method is still refused in one line.
    m = save_model(make_model("mixtral"), tmp_path / "m")
    capsys.readouterr()
    cfg = json.loads((m / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (m / "config.json").write_text(json.dumps(cfg))
    assert _job(tmp_path, m, ['{"input_ids": [5]}']) == 2
    _one_line(capsys, "quantization_config", "'gptq'", "not supported")


def test_unplaced_and_unknown_dtype_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file

    m = save_model(make_model("mixtral"), tmp_path / "m")
    full = load_file(str(m / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    extra = dict(full, **{key.replace("weight", "weight_scale_inv"): torch.ones(1, 1)})
    save_file(extra, str(m / "model.safetensors"))
    with pytest.raises(MoeloraError, match=r"1 tensor\(s\) this model does not place: "
                                           r"\['model.layers.0.self_attn.q_proj.weight_scale_inv'"):
        Engine.from_pretrained(str(m), progress=False)
    fp8 = dict(full, **{key: full[key].to(torch.float8_e4m3fn)})
    save_file(fp8, str(m / "model.safetensors"))
    with pytest.raises(FileError, match=r"q_proj.weight' is stored as torch.float8_e4m3fn"):
        Engine.from_pretrained(str(m), progress=False)


# -- exit codes and what is left on the screen ----------------------------------------------------

def test_layout_and_inspect_exit_2(capsys, tmp_path):
    assert cli_main(["layout", "--world", "4", "--tp", "3"]) == 2
    _one_line(capsys, "tp=3 does not divide world_size=4")
    assert cli_main(["inspect-adapter", str(tmp_path / "nope")]) == 2
    _one_line(capsys, "does not exist")


def test_no_progress_bar_is_left_open_over_an_error(tmp_path, capsys, model_dir, monkeypatch):
    """A failure inside a loop that draws a bar: the bar is closed before the line prints, so
    the error stays the last line on a terminal."""
    from tqdm import tqdm

    import moelora_dist.cli.common as common

    d1, d2 = _adapter(tmp_path / "a1"), _adapter(tmp_path / "a2")
    real = common.tqdm
    monkeypatch.setattr(common, "tqdm", lambda *a, **k: real(*a, **{**k, "disable": False}))
    (d2 / "adapter_model.safetensors").write_bytes(b"")  # the second adapter fails mid-loop
    rc = _job(tmp_path, model_dir, ['{"input_ids": [5]}'], adapters=[f"a={d1}", f"b={d2}"])
    assert rc == 2
    assert not list(getattr(tqdm, "_instances", []))
    err = capsys.readouterr().err.rstrip("\n").split("\n")
    assert "corrupt or truncated" in err[-1]


def test_negative_max_graph_tokens_is_refused(tmp_path, capsys, model_dir, no_model_load):
    assert _job(tmp_path, model_dir, ['{"input_ids": [5], "max_new_tokens": 2}'],
                "--max-graph-tokens", "-1", command="generate") == 2
    _one_line(capsys, "--max-graph-tokens -1: must be at least 0")


def test_max_graph_tokens_reaches_the_engine_config():
    """The CLI flag sets EngineConfig.max_graph_tokens (the graph buckets follow it)."""
    import argparse

    from moelora_dist.cli.common import add_model_arguments, engine_config

    p = argparse.ArgumentParser()
    add_model_arguments(p, generate=True)
    req = ["--model", "m", "--requests", "r.jsonl", "--out", "o"]
    for argv, want in (([], 2048), (["--max-graph-tokens", "256"], 256)):
        cfg = engine_config(p.parse_args(req + argv), max_loras=2, max_rank=8)
        assert cfg.max_graph_tokens == want and cfg.graph_buckets[-1] == want
    cfg = engine_config(p.parse_args(req + ["--max-graph-tokens", "0"]), max_loras=2, max_rank=8)
    assert cfg.graph_buckets == ()
