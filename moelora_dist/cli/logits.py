"""``moelora-dist logits``: prompt logits of a batch of requests that mix adapters.

    moelora-dist logits --model DIR --adapter a=LORA1 --adapter b=LORA2 \
        --requests req.jsonl --out logits.safetensors [--tp N --ep M] [--dtype float32|bfloat16]
    python -m launch --nproc-per-node 4 logits --model DIR ... --tp 4 --ep 2
    torchrun --nproc-per-node 4 -m moelora_dist.cli.logits --model DIR ... --tp 4 --ep 2

Each request line is ``{"input_ids": [...] | "prompt": "..." | "messages": [...], "adapter":
"NAME" | null}``. The output holds one float32 tensor per request, key ``request_<i>`` (``i`` =
0-based line of the request file), shape ``[prompt length, vocab]``: the logits of every prompt
position. Rank 0 writes it. The prompts run through the engine like any request (batched by
``--max-batch-tokens``, long ones in chunks), generating nothing.
"""

from __future__ import annotations

import argparse
import logging

from moelora_dist.cli.common import add_model_arguments, job_entry, main_job
from moelora_dist.files.paths import fail

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)


def run(engine, groups, args: argparse.Namespace, requests) -> int:
    """The job on a built engine and checked requests (callable from a driver that keeps its
    process groups)."""
    from safetensors.torch import save_file

    logits = engine.prompt_logits([r.prompt for r in requests], [r.adapter for r in requests],
                                  progress=groups.is_rank0)
    if groups.is_rank0:
        try:
            save_file({f"request_{r.line}": t.contiguous() for r, t in zip(requests, logits)},
                      args.out)
        except OSError as exc:
            raise fail("--out", args.out, exc.strerror or str(exc)) from None
        log.info("wrote logits of %d requests to %s", len(requests), args.out)
    return 0


def main(args: argparse.Namespace) -> int:
    return main_job(args, "logits", run)


if __name__ == "__main__":
    job_entry(__doc__, add_arguments, main)
