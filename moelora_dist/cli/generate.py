"""``moelora-dist generate``: generation for a batch of requests that mix adapters, on the engine.

    moelora-dist generate --model DIR --adapter a=LORA1 --requests req.jsonl --out out.jsonl \\
        [--tp N --ep M] [--dtype float32|bfloat16] [--device cpu|cuda]
    python -m launch --nproc-per-node 2 generate --model DIR ... --tp 2
    torchrun --nproc-per-node 2 -m moelora_dist.cli.generate --model DIR ... --tp 2

Each request line is ``{"input_ids": [...] | "prompt": "..." | "messages": [...], "adapter":
"NAME" | null, "max_new_tokens": N}`` with optional sampling keys (``temperature`` -- 0, greedy,
by default --, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``stop_token_ids``,
``ignore_eos``, ``logprobs``, ``prompt_logprobs``; :mod:`moelora_dist.engine.requests`).
Output: one JSON line per request, in request order:
``{"request": i, "output_ids": [...], "finish_reason": "length" | "eos" | "stop"}`` where
``output_ids`` are the new tokens only (an EOS token that stopped generation is included, as
Hugging Face ``generate`` does), plus ``"text"`` when the model has a tokenizer,
``"logprobs"`` / ``"prompt_logprobs"`` when asked (``{"token_id", "logprob", "top": [[id,
logprob], ...]}`` per token). Rank 0 writes it. Requests are served by continuous batching:
``--max-batch`` sequences at once, ``--max-batch-tokens`` tokens per forward (longer prompts
in chunks), KV pages as ``--num-pages`` / ``--gpu-memory-utilization`` say.
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


def _logprobs(items):
    return [None if x is None else {"token_id": x.token_id, "logprob": x.logprob,
                                    "top": [list(t) for t in x.top]} for x in items]


def run(engine, groups, args: argparse.Namespace, requests) -> int:
    """The job on a built engine and checked requests (callable from a driver that keeps its
    process groups)."""
    from moelora_dist.engine.outputs import Completion

    todo = [r for r in requests if r.max_new_tokens > 0]  # a line asking for 0 tokens: none
    got = iter(engine.generate([r.prompt for r in todo], [r.sampling for r in todo],
                               [r.adapter for r in todo], progress=groups.is_rank0))
    results = [next(got) if r.max_new_tokens > 0 else Completion(str(r.line), r.prompt, [],
                                                                  "length") for r in requests]
    if groups.is_rank0:
        with open_for_write(args.out, "--out") as f:
            for r, c in zip(requests, results):
                row = {"request": r.line, "output_ids": c.output_ids,
                       "finish_reason": c.finish_reason}
                if c.text is not None:
                    row["text"] = c.text
                if c.logprobs is not None:
                    row["logprobs"] = _logprobs(c.logprobs)
                if c.prompt_logprobs is not None:
                    row["prompt_logprobs"] = _logprobs(c.prompt_logprobs)
                f.write(json.dumps(row) + "\n")
        log.info("wrote %d generations to %s", len(requests), args.out)
    return 0


def main(args: argparse.Namespace) -> int:
    return main_job(args, "generate", run, need_max_new_tokens=True)


if __name__ == "__main__":
    job_entry(__doc__, add_arguments, main)
