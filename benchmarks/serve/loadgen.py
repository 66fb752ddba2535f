"""A load generator for an OpenAI-compatible server, on the standard library alone (asyncio
streams: HTTP/1.1, chunked transfer, server-sent events), so that it runs where no HTTP
client package is installed.

    stats, wall = asyncio.run(run_load("127.0.0.1", 8000, bodies, concurrency=64))
    stats, wall = asyncio.run(run_load("127.0.0.1", 8000, bodies, rate=20.0, seed=0))

Each body is a ``/v1/completions`` request with ``stream: true`` and ``return_token_ids``;
a request's first token is the first event that carries token ids. ``concurrency``: a closed
loop (each finished request starts the next); ``rate``: Poisson arrivals at that many requests
per second, however many are in flight.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field


@dataclass
class RequestStats:
    """Host times (``time.perf_counter``) of one request."""

    start: float
    token_times: list[float] = field(default_factory=list)
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for one token)."""
        if self.num_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.num_tokens - 1)


async def _read_chunked(reader):
    """Yield the body chunks of a chunked HTTP/1.1 response."""
    while True:
        size_line = await reader.readline()
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def stream_completion(host: str, port: int, body: dict, api_key: str | None = None
                            ) -> RequestStats:
    """POST ``body`` to /v1/completions and time its stream (see the module docstring)."""
    stats = RequestStats(time.perf_counter())
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n{auth}"
            "Accept: text/event-stream\r\nConnection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + payload)
        await writer.drain()
        status = (await reader.readline()).decode()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        if " 200 " not in status:
            stats.error = (status.strip() + " " + (await reader.read()).decode()[:300])
            return stats
        chunks = (_read_chunked(reader) if headers.get("transfer-encoding") == "chunked"
                  else _read_plain(reader))
        buf = b""
        async for data in chunks:
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                text = event[6:]
                if text == b"[DONE]":
                    return stats
                obj = json.loads(text)
                for choice in obj.get("choices", []):
                    ids = choice.get("token_ids") or []
                    if ids:
                        stats.token_times.append(time.perf_counter())
                        stats.num_tokens += len(ids)
                        stats.token_ids += ids
        stats.error = "the stream ended without [DONE]"
        return stats
    finally:
        writer.close()


async def _read_plain(reader):
    while data := await reader.read(65536):
        yield data


async def run_load(host: str, port: int, bodies: list[dict], *, concurrency: int | None = None,
                   rate: float | None = None, seed: int = 0, api_key: str | None = None
                   ) -> tuple[list[RequestStats], float]:
    """Send every body, closed-loop at ``concurrency`` or open-loop at ``rate`` req/s;
    returns the per-request stats (in body order) and the wall time of the whole load."""
    assert (concurrency is None) != (rate is None), "give concurrency or rate"
    results: list[RequestStats | None] = [None] * len(bodies)
    t0 = time.perf_counter()
    if concurrency is not None:
        todo = iter(range(len(bodies)))

        async def worker():
            for i in todo:
                results[i] = await stream_completion(host, port, bodies[i], api_key)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        rng = random.Random(seed)
        tasks = []
        for i, body in enumerate(bodies):
            tasks.append(asyncio.ensure_future(stream_completion(host, port, body, api_key)))
            await asyncio.sleep(rng.expovariate(rate))
        for i, t in enumerate(tasks):
            results[i] = await t
    return results, time.perf_counter() - t0
