"""``moelora-dist generate``: greedy generation for a batch of requests that mix adapters.

    moelora-dist generate --model DIR --adapter a=LORA1 --requests req.jsonl --out out.jsonl \
        [--tp N --ep M] [--dtype float32|bfloat16] [--device cpu|cuda]
    python -m launch --nproc-per-node 2 generate --model DIR ... --tp 2
    torchrun --nproc-per-node 2 -m moelora_dist.cli.generate --model DIR ... --tp 2

Each request line is ``{"input_ids": [...], "adapter": "NAME" | null, "max_new_tokens": N}``
(optional ``"ignore_eos": true``). Output: one JSON line per request, in request order:
``{"request": i, "output_ids": [...], "finish_reason": "length" | "eos"}`` where
``output_ids`` are the new tokens only (an EOS token that stopped generation is included, as
Hugging Face ``generate`` does). Rank 0 writes it.
"""

from __future__ import annotations

import argparse
import json
import logging

from moelora_dist.cli.common import add_model_arguments, job_entry, main_job
from moelora_dist.files.paths import open_for_write

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, generate=True)
    p.add_argument("--max-batch", type=int, default=64,
                   help="requests decoded together (default 64)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="decode eagerly; by default decode steps replay CUDA graphs on one GPU "
                        "(one process, waves of at most 256 requests)")


def run(runner, groups, args: argparse.Namespace, requests) -> int:
    """The job on a built runner and checked requests (callable from a driver that keeps its
    process groups)."""
    results = runner.generate(requests, max_batch=args.max_batch,
                              max_batch_tokens=args.max_batch_tokens, progress=groups.is_rank0,
                              cuda_graphs=args.cuda_graphs)
    if groups.is_rank0:
        with open_for_write(args.out, "--out") as f:
            for r, g in zip(requests, results):
                f.write(json.dumps({"request": r.line, "output_ids": g.output_ids,
                                    "finish_reason": g.finish_reason}) + "\n")
        log.info("wrote %d generations to %s", len(requests), args.out)
    return 0


def main(args: argparse.Namespace) -> int:
    return main_job(args, "generate", run, need_max_new_tokens=True)


if __name__ == "__main__":
    job_entry(__doc__, add_arguments, main)
