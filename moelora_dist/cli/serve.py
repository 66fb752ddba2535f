"""``moelora-dist serve``: an OpenAI-compatible HTTP server; each adapter is a model.

    moelora-dist serve --model DIR --adapter math=LORA1 --adapter code=LORA2 \\
        [--host 127.0.0.1 --port 8000] [--api-key KEY] [--served-model-name NAME]
    python -m launch --nproc-per-node 4 serve --model DIR --adapter ... --tp 4 --ep 2
    moelora-dist serve --random-weights qwen3-30b-a3b --random-adapters 8 --dtype bfloat16

Routes (docs/serve.md): ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET
/v1/models``, ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``, ``GET
/health``, ``GET /metrics``. A request names the base model (``--served-model-name``, default
the model directory's name) or an adapter as its ``model``. Under the launcher every rank
builds its part of the engine; TP rank 0 runs the scheduler and serves HTTP (from a child
process of its own unless ``--frontend thread``), the others follow its step plans. Every
option and the model's and adapters' configs are checked before any weight is read (a mistake
is one line, exit 2); the server needs the ``serve`` extra (``pip install
'moelora_dist[serve]'``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os

from moelora_dist.cli.common import (MODEL_DTYPES, check_launched, check_nonnegative,
                                     check_positive, engine_config, job_entry, make_groups,
                                     parse_adapter_args)
from moelora_dist.errors import MoeloraError, OptionError, report_user_error

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR",
                     help="Hugging Face model directory: config.json + *.safetensors (+ a "
                          "tokenizer for text prompts and chat)")
    src.add_argument("--random-weights", metavar="SHAPE",
                     help="random weights of a named shape instead of a checkpoint, for "
                          "benchmarks: qwen3-30b-a3b or tiny (token-id prompts only)")
    m.add_argument("--num-layers", type=int, default=None,
                   help="with --random-weights: decoder layers (default: the shape's)")
    m.add_argument("--random-adapters", type=int, default=0,
                   help="with --random-weights: serve N random adapters lora0..lora{N-1}")
    m.add_argument("--random-adapter-rank", type=int, default=16)
    m.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="PEFT adapter directory served as model NAME (repeatable)")
    m.add_argument("--served-model-name", default=None,
                   help="the base model's name in requests (default: the model directory's "
                        "name, or the shape's)")
    m.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    m.add_argument("--ep", type=int, default=1, help="expert-parallel degree; divides tp")
    m.add_argument("--dtype", choices=MODEL_DTYPES, default="float32")
    m.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    e = p.add_argument_group("engine")
    e.add_argument("--max-loras", type=int, default=None,
                   help="adapter slots on the device (default: adapters given, at least 1; "
                        "4 more with --enable-lora-loading)")
    e.add_argument("--max-rank", "--max-lora-rank", dest="max_rank", type=int, default=None,
                   help="largest LoRA rank (default: largest given; 64 with "
                        "--enable-lora-loading)")
    e.add_argument("--dispatcher", default="auto",
                   choices=("auto", "all_reduce", "all_to_all", "all_to_all_static",
                            "ref_all_reduce", "ref_all_to_all"))
    e.add_argument("--max-batch-tokens", "--max-num-batched-tokens", dest="max_batch_tokens",
                   type=int, default=8192, help="token budget of one forward (default 8192)")
    e.add_argument("--max-batch", "--max-num-seqs", dest="max_batch", type=int, default=256,
                   help="sequences running at once (default 256)")
    e.add_argument("--page-size", type=int, default=16)
    e.add_argument("--num-pages", type=int, default=None,
                   help="KV pages (default: from free device memory; CPU: 65536 tokens)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    e.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's positions)")
    e.add_argument("--enforce-eager", "--no-cuda-graphs", dest="enforce_eager",
                   action="store_true", help="never replay CUDA graphs")
    e.add_argument("--no-async-steps", dest="async_steps", action="store_false",
                   help="read each step's tokens back before planning the next (by "
                        "default the next step is planned and queued while the "
                        "device runs one)")
    e.add_argument("--max-graph-tokens", type=int, default=2048,
                   help="largest step, in tokens, replayed from a CUDA graph (default 2048; "
                        "0: none)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $MOELORA_API_KEY, else none)")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait for a place in the batch; more get 429")
    s.add_argument("--enable-lora-loading", action="store_true",
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    s.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="run-time loads read only adapters under DIR (needed with "
                        "--enable-lora-loading)")
    s.add_argument("--shutdown-timeout", type=float, default=20.0,
                   help="seconds requests in flight may take to finish after SIGTERM/SIGINT "
                        "before they are cancelled (default 20)")
    s.add_argument("--frontend", choices=("process", "thread"), default="process",
                   help="where HTTP runs: a process of its own fed through a socket (default; "
                        "it never takes the GIL from the engine), or a thread of the engine's "
                        "process (debugging, the benchmark's comparison)")
    s.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"))
    s.add_argument("--switch-interval-ms", type=float, default=None, metavar="MS",
                   help="the interpreter's GIL switch interval: how long the engine thread may "
                        "wait for the GIL while the HTTP thread holds it (default: Python's, "
                        "5 ms)")
    s.add_argument("--http-impl", default="auto", choices=("auto", "h11", "httptools"),
                   help="uvicorn's HTTP implementation (default auto: httptools when "
                        "installed, else h11)")
    s.add_argument("--event-loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                   help="uvicorn's event loop (default auto: uvloop when installed, else "
                        "asyncio)")


def check_options(args):
    """Every cheap check, before any process group or weight; returns (config, paths)."""
    from moelora_dist.adapters.loader import read_adapter_config
    from moelora_dist.config.model import ModelConfig
    from moelora_dist.serve.random_model import shape_config
    from moelora_dist.serve.security import API_KEY_ENV

    check_positive(args, "tp", "ep", "max_loras", "max_rank", "max_batch_tokens", "max_batch",
                   "page_size", "num_pages", "max_model_len", "max_waiting",
                   "random_adapter_rank")
    check_nonnegative(args, "max_graph_tokens")
    if not 0 < args.port < 65536:
        raise OptionError(f"--port {args.port}: must lie in 1..65535")
    if args.shutdown_timeout < 0:
        raise OptionError(f"--shutdown-timeout {args.shutdown_timeout}: must be >= 0")
    if args.switch_interval_ms is not None and not 1e-3 <= args.switch_interval_ms < math.inf:
        raise OptionError(f"--switch-interval-ms {args.switch_interval_ms}: must be a finite "
                          "number of at least 0.001 (the interpreter counts whole microseconds)")
    if args.enable_lora_loading and not args.adapter_root:
        raise OptionError("--enable-lora-loading needs --adapter-root DIR (the only place "
                          "run-time loads may read from)")
    if args.adapter_root and not os.path.isdir(args.adapter_root):
        raise OptionError(f"--adapter-root {args.adapter_root}: not a directory")
    if args.random_weights is None and (args.random_adapters or args.num_layers):
        raise OptionError("--random-adapters and --num-layers need --random-weights")
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_launched(args)
    if args.random_weights is not None:
        cfg = ModelConfig.from_dict(shape_config(args.random_weights, args.num_layers))
    else:
        cfg = ModelConfig.from_dir(args.model)
    paths = parse_adapter_args(args.adapter)
    for path in paths.values():
        read_adapter_config(path)
    return cfg, paths


def build(args, groups, cfg, paths):
    """The engine of this rank: weights, adapters (given and random), KV pages."""
    from moelora_dist.adapters import load_adapter
    from moelora_dist.dtypes import dtype_of
    from moelora_dist.engine.engine import Engine
    from moelora_dist.engine.text import TextCodec
    from moelora_dist.models.model import MoELoRAModel
    from moelora_dist.models.weights import CheckpointWeights, RandomWeights
    from moelora_dist.serve.random_model import random_adapter

    adapters = {n: load_adapter(p, model_config=cfg.raw, max_rank=args.max_rank, name=n)
                for n, p in paths.items()}
    dtype = dtype_of(args.dtype, MODEL_DTYPES)
    for i in range(args.random_adapters):  # the same numbers on every rank (seeded)
        adapters[f"lora{i}"] = random_adapter(f"lora{i}", cfg, args.random_adapter_rank, i + 1,
                                              groups.device, dtype)
    extra = 4 if args.enable_lora_loading else 0
    max_rank = args.max_rank or max([a.max_rank for a in adapters.values()]
                                    + [64 if args.enable_lora_loading else 1])
    max_loras = args.max_loras or max(len(adapters) + extra, 1)
    config = engine_config(args, max_loras, max_rank)
    source = (RandomWeights(cfg, dtype, groups.device) if args.random_weights
              else CheckpointWeights(args.model, cfg, dtype))
    model = MoELoRAModel.build(cfg, groups, source, dtype=dtype, max_loras=max_loras,
                               max_rank=max_rank, dispatcher=args.dispatcher,
                               progress=groups.is_rank0, max_positions=args.max_model_len)
    codec = TextCodec.from_model_dir(args.model) if args.model else None
    engine = Engine(model, config, codec)
    for name, adapter in adapters.items():  # every rank: the engine is built collectively
        engine.adapters.add(name, adapter)
    engine.adapters.take_ops()
    return engine


def serve_config(args):
    """The server's own settings from the options (checked by :func:`check_options`)."""
    from moelora_dist.serve.server import ServeConfig

    return ServeConfig(host=args.host, port=args.port, api_key=args.api_key,
                       max_waiting=args.max_waiting, enable_lora_loading=args.enable_lora_loading,
                       adapter_root=args.adapter_root, shutdown_timeout=args.shutdown_timeout,
                       log_level=args.log_level,
                       switch_interval_s=None if args.switch_interval_ms is None
                       else args.switch_interval_ms / 1e3,
                       http_impl=args.http_impl, event_loop=args.event_loop,
                       frontend=args.frontend)


def main(args: argparse.Namespace) -> int:
    from moelora_dist.logs import setup_logging
    from moelora_dist.parallel.groups import destroy_parallel

    args.command = "serve"
    groups = None
    try:
        try:
            from moelora_dist.serve.server import serve, uvicorn_choices
        except ImportError as exc:
            raise OptionError(f"serve needs the 'serve' extra ({exc.name} is missing): pip "
                              "install 'moelora_dist[serve]'") from None
        cfg, paths = check_options(args)
        config = serve_config(args)
        uvicorn_choices(config)  # httptools or uvloop asked for but not installed: said now
        groups = make_groups(args)
        if groups.layout.dp > 1:
            raise OptionError(f"serve runs one replica: --tp {args.tp} must equal the number "
                              f"of processes ({groups.layout.world_size}); start one server per "
                              "replica for data parallelism")
        setup_logging()
        engine = build(args, groups, cfg, paths)
        name = args.served_model_name or (os.path.basename(os.path.normpath(args.model))
                                          if args.model else args.random_weights)
        if groups.is_rank0:
            log.info("serving %r and adapters %s on http://%s:%d%s", name,
                        sorted(engine.adapter_names), args.host, args.port,
                        " (API key required)" if args.api_key else "")
        sources = {n: os.path.realpath(p) for n, p in paths.items()}
        return serve(engine, config, served_name=name,
                     model_root=os.path.realpath(args.model) if args.model
                     else f"random:{args.random_weights}", adapter_sources=sources,
                     model_dir=args.model)
    except MoeloraError as exc:
        return report_user_error("moelora-dist serve", exc)
    finally:
        if groups is not None and groups.backend != "none":
            destroy_parallel()


if __name__ == "__main__":
    job_entry(__doc__, add_arguments, main)
