"""What the ``logits`` and ``generate`` commands share: options, checks, groups, the engine.

Both commands run on the engine (:mod:`moelora_dist.engine`), on one process or under
``python -m launch --nproc-per-node N`` / ``torchrun``: every rank builds its part of the
model, each replica's leader schedules its share of the requests, and rank 0 writes the
output file. Everything a user can get wrong is checked first, in this order and before any
weight is read: option values, the model's ``config.json``, each adapter's config, the
request file (prompts, sampling options and adapter names, against the config and the
tokenizer), and that ``--out`` can be written. A mistake is one line on stderr and exit code 2
(:mod:`moelora_dist.errors`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
import tqdm.std as tqdm_std
from tqdm import tqdm

from moelora_dist.dtypes import dtype_of
from moelora_dist.errors import MoeloraError, OptionError, report_user_error
from moelora_dist.files.paths import check_writable
from moelora_dist.logs import setup_logging

MODEL_DTYPES = ("float32", "bfloat16", "float16")
log = logging.getLogger(__name__)


def add_model_arguments(p: argparse.ArgumentParser, generate: bool = False) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face model directory: config.json + *.safetensors (+ a "
                        "tokenizer for text prompts)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="PEFT adapter directory served under NAME (repeatable)")
    p.add_argument("--requests", required=True, metavar="FILE.jsonl",
                   help='one JSON object per line: {"input_ids": [...] | "prompt": "..." | '
                        '"messages": [...], "adapter": NAME|null'
                        + (', "max_new_tokens": N} plus optional sampling keys (temperature, '
                           'top_p, top_k, min_p, seed, stop, stop_token_ids, ignore_eos, '
                           'logprobs, prompt_logprobs; greedy by default)' if generate
                           else "}"))
    p.add_argument("--out", required=True, metavar="FILE", help="output file (rank 0 writes it)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel degree inside the TP group; divides tp (default 1)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="float32",
                   help="activation, LoRA and unquantized-weight dtype (default float32); an FP8 "
                        "checkpoint (detected from its quantization_config) keeps its FP8 "
                        "weights")
    p.add_argument("--dequantize-fp8", action="store_true",
                   help="FP8 checkpoint: dequantize its weights to --dtype at load (debugging: "
                        "no activation quantization, more memory)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--max-loras", type=int, default=None,
                   help="adapter slots on the device (default: number of --adapter, at least 1)")
    p.add_argument("--max-rank", type=int, default=None,
                   help="largest LoRA rank the pool holds (default: largest rank given)")
    p.add_argument("--dispatcher", default="auto",
                   choices=("auto", "all_reduce", "all_to_all", "all_to_all_static",
                            "ref_all_reduce", "ref_all_to_all"),
                   help="MoE dispatcher (default auto: all_reduce for small batches or ep<=2)")
    p.add_argument("--max-batch-tokens", "--max-num-batched-tokens", dest="max_batch_tokens",
                   type=int, default=8192,
                   help="token budget of one forward; longer prompts are prefilled in chunks "
                        "(default 8192)")
    p.add_argument("--max-batch", "--max-num-seqs", dest="max_batch", type=int, default=256,
                   help="sequences running at once (default 256)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default 16)")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV pages in the pool (default: sized from free device memory, on a "
                        "CPU 65536 tokens' worth)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory to fill with weights, pool and KV pages "
                        "(default 0.9)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's "
                        "max_position_embeddings)")
    p.add_argument("--enforce-eager", "--no-cuda-graphs", dest="enforce_eager",
                   action="store_true",
                   help="never replay CUDA graphs (by default every step of at most "
                        "--max-graph-tokens tokens replays one on CUDA, on every layout)")
    p.add_argument("--no-async-steps", dest="async_steps", action="store_false",
                   help="read each step's tokens back before planning the next (by "
                        "default the next step is planned and queued while the "
                        "device runs one)")
    p.add_argument("--max-graph-tokens", type=int, default=2048,
                   help="largest step, in tokens, replayed from a CUDA graph (default 2048: "
                        "decodes, mixed steps and prompt chunks up to it; 0: none)")


def check_at_least(args, low: int, *names: str) -> None:
    """Each ``--name`` given must be an integer >= ``low``."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise OptionError(f"--{name.replace('_', '-')} {value}: must be at least {low}")


def check_nonnegative(args, *names: str) -> None:
    check_at_least(args, 0, *names)


def check_positive(args, *names: str) -> None:
    check_at_least(args, 1, *names)


def parse_adapter_args(specs: list[str]) -> dict[str, str]:
    """``["name=dir", ...]`` -> ``{name: dir}``; OptionError for a malformed or repeated one."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise OptionError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in out:
            raise OptionError(f"--adapter name {name!r} is given twice")
        out[name] = path
    return out


def close_progress_bars() -> None:
    """Close every live progress bar, so an error printed next is the last line on screen."""
    for bar in list(tqdm_std.tqdm._instances):
        bar.close()


def check_inputs(args, *, need_max_new_tokens: bool):
    """Every cheap check, before any process group or weight (module docstring).

    Returns ``(model config, {adapter name: dir}, request specs, text codec or None)``; the
    specs' prompts are token ids afterwards.
    """
    from moelora_dist.adapters.loader import read_adapter_config
    from moelora_dist.config.model import ModelConfig
    from moelora_dist.engine.engine import load_codec
    from moelora_dist.engine.prompts import RequestError, prompt_ids
    from moelora_dist.engine.requests import read_requests
    from moelora_dist.models.fp8_layout import check_fp8_layout

    check_positive(args, "tp", "ep", "max_loras", "max_rank", "max_batch_tokens", "max_batch",
                   "page_size", "num_pages", "max_model_len")
    check_nonnegative(args, "max_graph_tokens")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise OptionError(f"--gpu-memory-utilization {args.gpu_memory_utilization}: must lie "
                          "in (0, 1]")
    check_launched(args)
    cfg = apply_fp8_options(ModelConfig.from_dir(args.model), args)
    check_fp8_layout(cfg, args.tp, args.ep)  # before any process group
    paths = parse_adapter_args(args.adapter)
    for path in paths.values():
        read_adapter_config(path)
    specs = read_requests(args.requests, need_max_new_tokens=need_max_new_tokens)
    codec, codec_error = load_codec(args.model)
    max_len = args.max_model_len or cfg.max_positions
    for s in specs:
        where = f"{args.requests}: request line {s.line}"
        try:
            s.prompt = prompt_ids(s.prompt, codec, cfg.vocab_size, codec_error)
            s.sampling.validate(cfg.vocab_size)
            if s.sampling.stop and codec is None:
                raise RequestError("stop strings need the model's tokenizer; use "
                                   "stop_token_ids")
        except MoeloraError as exc:
            raise RequestError(f"{where}: {exc}") from None
        if s.adapter is not None and s.adapter not in paths:
            raise RequestError(f"{where}: unknown adapter {s.adapter!r}; registered: "
                               f"{sorted(paths) or 'none'} (add it with --adapter NAME=DIR)")
        total = len(s.prompt) + s.max_new_tokens
        if max_len is not None and total > max_len:
            raise RequestError(f"{where}: {len(s.prompt)} prompt + {s.max_new_tokens} new "
                               f"tokens exceed the model's {max_len} positions")
    check_writable(args.out, "--out")
    return cfg, paths, specs, codec


def apply_fp8_options(cfg, args):
    """The config with ``--dequantize-fp8`` applied (OptionError on a checkpoint that is not
    FP8)."""
    import dataclasses

    if not getattr(args, "dequantize_fp8", False):
        return cfg
    if cfg.fp8 is None:
        raise OptionError(f"--dequantize-fp8: {args.model} is not an FP8 checkpoint (its "
                          "config.json has no fine-grained FP8 quantization_config)")
    return dataclasses.replace(cfg, fp8=dataclasses.replace(cfg.fp8, dequantize=True))


def check_launched(args) -> None:
    """``--tp``/``--ep`` above 1 need processes from the launcher (or torchrun), and
    ``--device cuda`` needs a GPU; said before anything is read."""
    from moelora_dist.parallel.layout import LayoutError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda but torch sees no CUDA device; use --device cpu")
    if "RANK" not in os.environ and (args.tp != 1 or args.ep != 1):
        raise LayoutError(
            f"--tp {args.tp} --ep {args.ep} needs {args.tp} processes; run it as "
            f"`python -m launch --nproc-per-node {args.tp} {args.command} ...` or torchrun")


def make_groups(args):
    """Process groups for ``--tp/--ep`` (a single process needs no torch.distributed)."""
    from moelora_dist.parallel.groups import ParallelGroups, init_parallel

    check_launched(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return ParallelGroups.single(torch.device("cuda", torch.cuda.current_device())
                                     if device == "cuda" else "cpu")
    return init_parallel(args.tp, args.ep, backend="gloo" if device == "cpu" else "nccl")


def engine_config(args, max_loras: int, max_rank: int):
    """The validated ``EngineConfig`` of the batch, page, memory and dispatcher options, with
    the pool sized to ``max_loras`` slots of rank ``max_rank``."""
    from moelora_dist.engine.config import EngineConfig

    config = EngineConfig(max_num_seqs=args.max_batch, max_num_batched_tokens=args.max_batch_tokens,
                          page_size=args.page_size, num_pages=args.num_pages,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          max_model_len=args.max_model_len, max_loras=max_loras,
                          max_rank=max_rank, enforce_eager=args.enforce_eager,
                          max_graph_tokens=args.max_graph_tokens, dispatcher=args.dispatcher,
                          async_steps=args.async_steps)
    config.validate()
    return config


def build_engine(args, groups, cfg, paths: dict[str, str], codec=None):
    """Read the adapters (host memory), size the pool to them, load the model, build the
    engine (its KV pages sized as the options say), register the adapters."""
    from moelora_dist.adapters import load_adapter
    from moelora_dist.engine.engine import Engine
    from moelora_dist.models.model import MoELoRAModel
    from moelora_dist.models.weights import CheckpointWeights

    adapters = {n: load_adapter(p, model_config=cfg.raw, max_rank=args.max_rank, name=n)
                for n, p in tqdm(paths.items(), desc="reading adapters", unit="adapter",
                                 disable=not (groups.is_rank0 and paths))}
    max_rank = args.max_rank or max([a.max_rank for a in adapters.values()] + [1])
    max_loras = args.max_loras or max(len(adapters), 1)
    config = engine_config(args, max_loras, max_rank)
    dtype = dtype_of(args.dtype, MODEL_DTYPES)
    model = MoELoRAModel.build(cfg, groups, CheckpointWeights(args.model, cfg, dtype),
                               dtype=dtype, max_loras=max_loras, max_rank=max_rank,
                               dispatcher=args.dispatcher, progress=groups.is_rank0,
                               max_positions=args.max_model_len)
    engine = Engine(model, config, codec)
    for name, adapter in adapters.items():  # every rank: the engine is built collectively
        engine.adapters.add(name, adapter)
    engine.adapters.take_ops()
    return engine


def main_job(args, command: str, run, *, need_max_new_tokens: bool = False) -> int:
    """The ``main`` of a model job: checks, groups, engine, then ``run(engine, groups, args,
    requests) -> int``; a user mistake prints one line and returns 2, with no progress bar
    left drawn over it."""
    from moelora_dist.parallel.groups import destroy_parallel

    args.command = command
    groups = None
    try:
        cfg, paths, requests, codec = check_inputs(args,
                                                   need_max_new_tokens=need_max_new_tokens)
        groups = make_groups(args)
        setup_logging()
        engine = build_engine(args, groups, cfg, paths, codec)
        return run(engine, groups, args, requests)
    except MoeloraError as exc:
        close_progress_bars()
        return report_user_error(f"moelora-dist {command}", exc)
    finally:
        if groups is not None and groups.backend != "none":
            destroy_parallel()


def job_entry(module_doc: str, add_arguments, main) -> None:
    """``python -m moelora_dist.cli.<job>`` (and torchrun ``-m``): parse, run, exit."""
    prog = f"python -m {sys.modules['__main__'].__spec__.name}" if getattr(
        sys.modules.get("__main__"), "__spec__", None) else "job"
    parser = argparse.ArgumentParser(prog=prog, description=module_doc.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
