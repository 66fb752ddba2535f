"""What the ``logits`` and ``generate`` commands share: options, process groups, the runner.

Both commands run on one process or under ``python -m launch --nproc-per-node N`` /
``torchrun``; every rank builds its part of the model and runs the same requests, and rank 0
writes the output file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
from tqdm import tqdm

from moelora_dist.models.requests import RequestError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="compute and weight dtype (default float32)")
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


def parse_adapter_args(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise RequestError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in out:
            raise RequestError(f"--adapter name {name!r} is given twice")
        out[name] = path
    return out


def setup_logging(rank0: bool) -> None:
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def make_groups(args):
    """Process groups for ``--tp/--ep`` (a single process needs no torch.distributed)."""
    from moelora_dist.parallel.groups import ParallelGroups, init_parallel
    from moelora_dist.parallel.layout import LayoutError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RequestError("--device cuda but torch sees no CUDA device; use --device cpu")
    launched = "RANK" in os.environ
    if not launched:
        if args.tp != 1 or args.ep != 1:
            raise LayoutError(
                f"--tp {args.tp} --ep {args.ep} needs {args.tp} processes; run it as "
                f"`python -m launch --nproc-per-node {args.tp} {args.command} ...` or torchrun")
        return ParallelGroups.single(torch.device("cuda", torch.cuda.current_device())
                                     if device == "cuda" else "cpu")
    return init_parallel(args.tp, args.ep, backend="gloo" if device == "cpu" else "nccl")


def build_runner(args, groups):
    """Read the adapters (host memory), size the pool to them, load the model, register them."""
    from moelora_dist.adapters import load_adapter
    from moelora_dist.models.config import ModelConfig
    from moelora_dist.models.runner import ModelRunner

    cfg = ModelConfig.from_dir(args.model)
    paths = parse_adapter_args(args.adapter)
    adapters = {n: load_adapter(p, model_config=cfg.raw, max_rank=args.max_rank, name=n)
                for n, p in tqdm(paths.items(), desc="reading adapters", unit="adapter",
                                 disable=not (groups.is_rank0 and paths))}
    max_rank = args.max_rank or max([a.max_rank for a in adapters.values()] + [1])
    max_loras = args.max_loras or max(len(adapters), 1)
    runner = ModelRunner.from_pretrained(
        args.model, groups, dtype=DTYPES[args.dtype], max_loras=max_loras, max_rank=max_rank,
        dispatcher=args.dispatcher, progress=groups.is_rank0)
    for name, adapter in adapters.items():
        runner.add_adapter(name, adapter)
    return runner


def run_job(args, body) -> int:
    """Set up groups and runner, run ``body(runner, groups) -> int``, always tear down."""
    from moelora_dist.parallel.groups import destroy_parallel

    groups = None
    try:
        groups = make_groups(args)
        setup_logging(groups.is_rank0)
        return body(build_runner(args, groups), groups)
    finally:
        if groups is not None and groups.backend != "none":
            destroy_parallel()


def main_job(args, command: str, run) -> int:
    """The ``main`` of a model job: :func:`run_job` with ``run(runner, groups, args) -> int``;
    a user mistake (every one is a ValueError subclass naming the fix) prints one line, exit 2."""
    args.command = command
    try:
        return run_job(args, lambda runner, groups: run(runner, groups, args))
    except ValueError as exc:
        print(f"moelora-dist {command}: error: {exc}", file=sys.stderr)
        return 2
