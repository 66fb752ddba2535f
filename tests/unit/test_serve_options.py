"""The server's GIL and uvicorn options, in process (no server started): ``--switch-interval-ms``
and a fast HTTP implementation or event loop that is not installed are one line and exit 2
before any engine is built; the options reach :class:`ServeConfig`, the switch interval reaches
the interpreter and the HTTP implementation and loop reach ``uvicorn.Config``; and the serving
benchmark's ``--http-variant NAME=ARGS``: its parsing, its checks before the offline side runs,
and its rows (one offline row per case, one http row per variant against it)."""

import argparse
import csv
import logging
import math
import sys

import pytest

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")

import benchmarks.serve.bench_serve as bench  # noqa: E402
import moelora_dist.cli.serve as serve_cli  # noqa: E402
import moelora_dist.serve.server as server  # noqa: E402
from benchmarks.serve.loadgen import RequestStats  # noqa: E402
from moelora_dist.cli.main import main as cli_main  # noqa: E402
from moelora_dist.serve.server import (ServeConfig, apply_switch_interval,  # noqa: E402
                                       uvicorn_choices, uvicorn_config)

TINY = ["serve", "--random-weights", "tiny", "--device", "cpu"]


@pytest.fixture
def no_engine(monkeypatch):
    """Building the process groups or the engine fails the test: the checks come before."""
    def refuse(*a, **k):
        raise AssertionError("the engine was built before the bad option was refused")

    monkeypatch.setattr(serve_cli, "make_groups", refuse)
    monkeypatch.setattr(serve_cli, "build", refuse)


@pytest.fixture
def switch_interval():
    """The interpreter's switch interval, restored after the test."""
    before = sys.getswitchinterval()
    yield before
    sys.setswitchinterval(before)


def _one_line(capsys, *needles):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("moelora-dist serve: error: "), err[0]
    for n in needles:
        assert n in err[0], (n, err[0])


def _options(*argv):
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    return p.parse_args(["--random-weights", "tiny", *argv])


@pytest.mark.parametrize("value", ["0", "-1", "0.0001", "nan", "inf"])
def test_a_bad_switch_interval_is_one_line(capsys, no_engine, value):
    assert cli_main([*TINY, "--switch-interval-ms", value]) == 2
    _one_line(capsys, "--switch-interval-ms", "at least 0.001")


@pytest.mark.parametrize("flag,package", [("--http-impl", "httptools"),
                                          ("--event-loop", "uvloop")])
def test_a_fast_package_asked_for_but_missing_is_one_line(capsys, monkeypatch, no_engine, flag,
                                                          package):
    monkeypatch.setattr(server, "_importable", lambda module: module != package)
    assert cli_main([*TINY, flag, package]) == 2
    _one_line(capsys, f"{flag} {package}", f"pip install {package}")


def test_the_options_reach_the_serve_config():
    config = serve_cli.serve_config(_options())
    assert (config.switch_interval_s, config.http_impl, config.event_loop) == (None, "auto",
                                                                               "auto")
    config = serve_cli.serve_config(_options("--switch-interval-ms", "0.2", "--http-impl", "h11",
                                             "--event-loop", "asyncio"))
    assert math.isclose(config.switch_interval_s, 2e-4)
    assert (config.http_impl, config.event_loop) == ("h11", "asyncio")


def test_the_leader_sets_the_switch_interval(switch_interval, caplog):
    caplog.set_level(logging.INFO, logger=server.__name__)
    apply_switch_interval(ServeConfig())  # None: the interpreter's stays
    assert sys.getswitchinterval() == switch_interval and not caplog.records
    apply_switch_interval(ServeConfig(switch_interval_s=2e-4))
    assert math.isclose(sys.getswitchinterval(), 2e-4, rel_tol=1e-3)
    assert [r.getMessage() for r in caplog.records] == [
        "GIL switch interval 0.2 ms (Python's default 5 ms)"]


async def _app(scope, receive, send):
    pass


@pytest.mark.parametrize("installed", [True, False], ids=["fast_installed", "fast_missing"])
def test_uvicorn_gets_the_http_implementation_and_loop(monkeypatch, caplog, installed):
    """"auto" resolves as uvicorn resolves it, so the start-up line names what really runs;
    a choice by name goes through as it is."""
    monkeypatch.setattr(server, "_importable", lambda module: installed)
    caplog.set_level(logging.INFO, logger=server.__name__)
    config = uvicorn_config(_app, ServeConfig(port=8123, shutdown_timeout=3.0))
    want = ("httptools", "uvloop") if installed else ("h11", "asyncio")
    assert (config.http, config.loop) == want
    assert (config.port, config.timeout_graceful_shutdown, config.lifespan) == (8123, 3.0, "off")
    assert caplog.records[-1].getMessage() == (f"uvicorn: HTTP implementation {want[0]}, "
                                               f"event loop {want[1]}")
    config = uvicorn_config(_app, ServeConfig(http_impl="h11", event_loop="asyncio"))
    assert (config.http, config.loop) == ("h11", "asyncio")


def test_uvicorn_loads_httptools_and_uvloop_when_asked():
    """With the packages installed, uvicorn really runs them (its own loading, not ours)."""
    pytest.importorskip("httptools", reason="httptools is not installed (pip install httptools)")
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (pip install uvloop)")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = uvicorn_config(_app, ServeConfig(http_impl="httptools", event_loop="uvloop"))
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert uvicorn_choices(ServeConfig()) == {"http_impl": "httptools", "event_loop": "uvloop"}


# -- the serving benchmark's variants -----------------------------------------------------------

def test_http_variants_parse():
    assert bench.parse_variant("si=--switch-interval-ms 0.2") == (
        "si", ["--switch-interval-ms", "0.2"])
    assert bench.parse_variant("default=") == ("default", [])
    assert bench.parse_variant("q=--api-key 'a b'") == ("q", ["--api-key", "a b"])
    for bad in ("si", "=--switch-interval-ms 1", "a/b=", "x=--api-key 'open"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=ARGS|closing quotation"):
            bench.parse_variant(bad)


def test_http_variants_default_and_checks(capsys):
    tiny = ["--tiny", "--device", "cpu"]
    assert bench.parse_args(tiny).variants == [("default", [])]
    assert bench.parse_args([*tiny, "--http-variant", "a=", "--http-variant",
                             "b=--switch-interval-ms 0.5"]).variants == [
        ("a", []), ("b", ["--switch-interval-ms", "0.5"])]
    for variants, needle in (
            (["a=", "a=--http-impl h11"], "a name is given twice"),
            (["bad"], "expected NAME=ARGS"),
            (["si=--switch-interval-ms 0"], "--http-variant si: --switch-interval-ms 0.0"),
            (["x=--no-such-option 1"], "--http-variant x: unknown server options"),
            (["h=--http-impl nope"], "--http-variant h: argument --http-impl: invalid choice")):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args([*tiny, *(a for v in variants for a in ("--http-variant", v))])
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err


def test_each_variant_is_measured_against_the_same_offline_row(tmp_path, monkeypatch, capsys):
    """Fake sides: the offline side at 100 tok/s for each case, variant "a" at 90 and "b" at
    80; "b" fails its check. Every http row's overhead is against the offline row of its case,
    each variant keeps its own server log, and the run exits 1 for "b"."""
    def stats(**kw):
        return dict(requests=1, errors=0, ttft_p50_ms=1, ttft_p99_ms=1, tpot_p50_ms=1,
                    tpot_p99_ms=1, **kw)

    def run_offline(args, spec, work):
        return dict(cases=[stats(out_tok_s=100.0) for _ in spec["cases"]],
                    check=[[[1, 2]] for _ in spec["check"]])

    def run_http(args, spec, variant, log_path):
        name, extra = variant
        open(log_path, "w").write(f"server {name} {extra}\n")
        rate = {"a": 90.0, "b": 80.0}[name]
        check = [[RequestStats(0.0, token_ids=[1, 2] if name == "a" else [9])]
                 for _ in spec["check"]]
        return [(case, stats(out_tok_s=rate)) for case in spec["cases"]], check

    monkeypatch.setattr(bench, "run_offline", run_offline)
    monkeypatch.setattr(bench, "run_http", run_http)
    code = bench.main(["--tiny", "--device", "cpu", "--concurrency", "2", "--out-dir",
                       str(tmp_path), "--http-variant", "a=",
                       "--http-variant", "b=--switch-interval-ms 0.2"])
    assert code == 1
    rows = list(csv.DictReader(open(tmp_path / "serve_cpu.csv")))
    assert [(r["side"], r["variant"], r["mode"], r["http_overhead"], r["check_ok"])
            for r in rows] == [
        (side, variant, mode, over, ok) for mode in ("base", "lora8") for side, variant, over, ok
        in (("offline", "", "", "False"), ("http", "a", "0.1", "True"),
            ("http", "b", "0.2", "False"))]
    assert (tmp_path / "serve_server_cpu_a.log").read_text() == "server a []\n"
    assert (tmp_path / "serve_server_cpu_b.log").read_text() == \
        "server b ['--switch-interval-ms', '0.2']\n"
    lines = capsys.readouterr().out.splitlines()[:-1]
    assert [line.split()[:2] + line.split()[-2:] for line in lines] == [
        [side, mode, "check", ok] for mode in ("base", "lora8") for side, ok in
        (("offline", "FAILED"), ("http[a]", "ok"), ("http[b]", "FAILED"))]


def test_a_negative_max_graph_tokens_is_one_line_and_the_flag_reaches_the_engine(capsys,
                                                                                 no_engine):
    assert cli_main([*TINY, "--max-graph-tokens", "-1"]) == 2
    _one_line(capsys, "--max-graph-tokens -1: must be at least 0")
    cfg = serve_cli.engine_config(_options("--max-graph-tokens", "512"), max_loras=1, max_rank=8)
    assert cfg.max_graph_tokens == 512 and cfg.graph_buckets[-1] == 512
