"""The requests of the serving benchmark, the same on both sides (HTTP and offline engine), and
the statistics both report.

    reqs = make_requests(case, vocab_size=151936, num_adapters=8)  # [(prompt ids, adapter)]
    row = summarize(stats, wall)     # throughput, TTFT and TPOT p50/p99

A case is a dict: ``mode`` ("base": no adapter; "lora8": request i uses ``lora{i % 8}``),
``concurrency`` (closed loop) or ``rate`` (Poisson arrivals, HTTP only), ``num_requests``,
``prompt_len``, ``output_len`` (greedy, EOS ignored: every request makes exactly that many),
``seed`` (the prompts' random ids).
"""

from __future__ import annotations

import random

from moelora_dist.engine.config import GRAPH_BUCKETS


def make_requests(case: dict, vocab_size: int, num_adapters: int
                  ) -> list[tuple[list[int], str | None]]:
    rng = random.Random(case["seed"])
    out = []
    for i in range(case["num_requests"]):
        prompt = [rng.randrange(vocab_size) for _ in range(case["prompt_len"])]
        adapter = f"lora{i % num_adapters}" if case["mode"] == "lora8" else None
        out.append((prompt, adapter))
    return out


def completion_body(prompt: list[int], adapter: str | None, output_len: int,
                    base_name: str) -> dict:
    return {"model": adapter or base_name, "prompt": prompt, "max_tokens": output_len,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}


def warmup_cases(max_concurrency: int, modes: tuple[str, ...],
                 timed: list[dict] = ()) -> list[dict]:
    """Untimed cases that capture every graph a timed case can reach: ``b`` requests that
    decode together, for each graph bucket ``b`` up to the largest concurrency's; then each
    timed case again with 4 output tokens, whose prompts' chunks mixed with decodes reach the
    mixed-step graphs (the H200 run of 2026-12-02 without these captured them inside the timed
    cases: 0.3-2.9 s each, an offline/HTTP difference of -10% to +19% at 64 streams)."""
    top = next((b for b in GRAPH_BUCKETS if b >= max_concurrency), GRAPH_BUCKETS[-1])
    decode = [dict(mode=m, concurrency=b, num_requests=b, prompt_len=16, output_len=4, seed=99)
              for m in modes for b in GRAPH_BUCKETS if b <= top]
    return decode + [dict(c, output_len=min(4, c["output_len"]), seed=c["seed"] + 1000)
                     for c in timed]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def summarize(stats, wall: float) -> dict:
    """Throughput and latency columns over one case's requests (``RequestStats``)."""
    errors = [s.error for s in stats if s.error]
    good = [s for s in stats if not s.error and s.num_tokens]
    ttft = [s.ttft for s in good]
    tpot = [s.tpot for s in good if s.tpot is not None]
    tokens = sum(s.num_tokens for s in good)
    return dict(requests=len(stats), errors=len(errors), output_tokens=tokens,
                wall_s=round(wall, 3), out_tok_s=round(tokens / wall, 2) if wall else 0.0,
                req_s=round(len(good) / wall, 3) if wall else 0.0,
                ttft_p50_ms=round(1e3 * _pct(ttft, 0.5), 2),
                ttft_p99_ms=round(1e3 * _pct(ttft, 0.99), 2),
                tpot_p50_ms=round(1e3 * _pct(tpot, 0.5), 3),
                tpot_p99_ms=round(1e3 * _pct(tpot, 0.99), 3),
                first_error=errors[0][:200] if errors else "")


# Engine counters a case reports (offline: ``Engine.counters``; HTTP: the server's /metrics).
STEP_COUNTERS = ("steps", "decode_steps", "step_seconds")


def step_columns(deltas: dict, wall: float) -> dict:
    """What the engine did during a case: its steps, how many decoded only (no prompt chunk in
    the batch), the wall time per step (``ms_per_step``) and the time inside ``Engine.step``
    per step (``step_ms``; the rest is the gap between steps). The two sides run the same engine; a side with more
    steps, or fewer decode-only ones, scheduled the same requests differently (e.g. prompts
    that arrived apart joined decode steps one by one)."""
    steps = int(deltas.get("steps", 0))
    return dict(steps=steps, decode_steps=int(deltas.get("decode_steps", 0)),
                ms_per_step=round(1e3 * wall / steps, 3) if steps else 0.0,
                step_ms=round(1e3 * deltas.get("step_seconds", 0.0) / steps, 3) if steps
                else 0.0)


def parse_counters(metrics_text: str, prefix: str = "moelora_") -> dict:
    """The :data:`STEP_COUNTERS` from a Prometheus text exposition (the server's /metrics)."""
    out = {}
    for line in metrics_text.splitlines():
        for name in STEP_COUNTERS:
            if line.startswith(f"{prefix}{name}_total "):
                out[name] = float(line.split()[1])
    return out
