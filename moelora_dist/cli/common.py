"""What the ``logits`` and ``generate`` commands share: options, checks, groups, the runner.

Both commands run on one process or under ``python -m launch --nproc-per-node N`` /
``torchrun``; every rank builds its part of the model and runs the same requests, and rank 0
writes the output file. Everything a user can get wrong is checked first, in this order and
before any weight is read: option values, the model's ``config.json``, each adapter's config,
the request file (against the config and the adapter names), and that ``--out`` can be
written. A mistake is one line on stderr and exit code 2 (:mod:`moelora_dist.errors`).
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
                   help="Hugging Face model directory: config.json + *.safetensors")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="PEFT adapter directory served under NAME (repeatable)")
    p.add_argument("--requests", required=True, metavar="FILE.jsonl",
                   help='one JSON object per line: {"input_ids": [...], "adapter": NAME|null'
                        + (', "max_new_tokens": N} (optional "ignore_eos": true)' if generate
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
                   choices=("auto", "all_reduce", "all_to_all", "ref_all_reduce", "ref_all_to_all"),
                   help="MoE dispatcher (default auto: all_reduce for small batches or ep=1)")
    p.add_argument("--max-batch-tokens", type=int, default=8192,
                   help="token budget of one forward (default 8192)")


def check_positive(args, *names: str) -> None:
    """Each ``--name`` given must be a positive integer."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise OptionError(f"{flag} {value}: must be at least 1")


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

    Returns ``(model config, {adapter name: dir}, requests)``.
    """
    from moelora_dist.adapters.loader import read_adapter_config
    from moelora_dist.config.model import ModelConfig
    from moelora_dist.models.fp8_layout import check_fp8_layout
    from moelora_dist.models.requests import read_requests, validate_requests

    check_positive(args, "tp", "ep", "max_loras", "max_rank", "max_batch_tokens", "max_batch")
    check_launched(args)
    cfg = apply_fp8_options(ModelConfig.from_dir(args.model), args)
    check_fp8_layout(cfg, args.tp, args.ep)  # before any process group
    paths = parse_adapter_args(args.adapter)
    for path in paths.values():
        read_adapter_config(path)
    requests = read_requests(args.requests, need_max_new_tokens=need_max_new_tokens)
    validate_requests(requests, vocab_size=cfg.vocab_size, adapters=paths,
                      max_len=cfg.max_positions)
    check_writable(args.out, "--out")
    return cfg, paths, requests


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


def build_runner(args, groups, cfg, paths: dict[str, str]):
    """Read the adapters (host memory), size the pool to them, load the model, register them."""
    from moelora_dist.adapters import load_adapter
    from moelora_dist.models.runner import ModelRunner

    adapters = {n: load_adapter(p, model_config=cfg.raw, max_rank=args.max_rank, name=n)
                for n, p in tqdm(paths.items(), desc="reading adapters", unit="adapter",
                                 disable=not (groups.is_rank0 and paths))}
    max_rank = args.max_rank or max([a.max_rank for a in adapters.values()] + [1])
    max_loras = args.max_loras or max(len(adapters), 1)
    runner = ModelRunner.from_pretrained(
        args.model, groups, dtype=dtype_of(args.dtype, MODEL_DTYPES), max_loras=max_loras,
        max_rank=max_rank, dispatcher=args.dispatcher, progress=groups.is_rank0, config=cfg)
    for name, adapter in adapters.items():
        runner.add_adapter(name, adapter)
    return runner


def main_job(args, command: str, run, *, need_max_new_tokens: bool = False) -> int:
    """The ``main`` of a model job: checks, groups, runner, then ``run(runner, groups, args,
    requests) -> int``; a user mistake prints one line and returns 2, with no progress bar
    left drawn over it."""
    from moelora_dist.parallel.groups import destroy_parallel

    args.command = command
    groups = None
    try:
        cfg, paths, requests = check_inputs(args, need_max_new_tokens=need_max_new_tokens)
        groups = make_groups(args)
        setup_logging()
        runner = build_runner(args, groups, cfg, paths)
        return run(runner, groups, args, requests)
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
