"""``moelora-dist logits``: prompt logits of a batch of requests that mix adapters.

    moelora-dist logits --model DIR --adapter a=LORA1 --adapter b=LORA2 \
        --requests req.jsonl --out logits.safetensors [--tp N --ep M] [--dtype float32|bfloat16]
    python -m launch --nproc-per-node 4 logits --model DIR ... --tp 4 --ep 2
    torchrun --nproc-per-node 4 -m moelora_dist.jobs.logits --model DIR ... --tp 4 --ep 2

Each request line is ``{"input_ids": [...], "adapter": "NAME" | null}``. The output holds one
float32 tensor per request, key ``request_<i>`` (``i`` = 0-based line of the request file),
shape ``[len(input_ids), vocab]``: the logits of every prompt position. Rank 0 writes it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from moelora_dist.models.cli_common import add_model_arguments, main_job

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)


def run(runner, groups, args: argparse.Namespace) -> int:
    """The job on a built runner (callable from a driver that keeps its process groups)."""
    from safetensors.torch import save_file

    from moelora_dist.models.requests import read_requests

    requests = read_requests(args.requests)
    logits = runner.prompt_logits(requests, max_batch_tokens=args.max_batch_tokens,
                                  progress=groups.is_rank0)
    if groups.is_rank0:
        save_file({f"request_{r.line}": t.contiguous() for r, t in zip(requests, logits)},
                  args.out)
        log.info("wrote logits of %d requests to %s", len(requests), args.out)
    return 0


def main(args: argparse.Namespace) -> int:
    return main_job(args, "logits", run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m moelora_dist.jobs.logits",
                                     description="prompt logits with mixed adapters")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
