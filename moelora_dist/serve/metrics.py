"""``GET /metrics``: Prometheus text of the engine's state and the server's latencies.

Names (prefix ``moelora_``; vLLM's ``vllm:`` names have the same meaning):

- gauges from the engine (read at scrape time from the engine thread's last snapshot):
  ``requests_running``, ``requests_waiting``, ``kv_pages_used``, ``kv_pages_total``,
  ``kv_page_size_tokens``, ``lora_slots_used`` (slots holding an adapter), ``lora_slots_total``,
  ``adapter_requests{adapter, state="running"|"waiting"}``, ``adapters_loaded``;
- counters from the engine: ``prompt_tokens_total`` (computed, recomputation after a
  preemption included), ``generation_tokens_total``, ``preemptions_total``, ``steps_total``, ``decode_steps_total``, ``step_seconds_total``,
  ``adapter_requests_finished_total{adapter}``;
- the server's: ``requests_total{model, status}`` of admitted requests (status ``ok``,
  ``abort`` for a client that went away or a shutdown, ``error`` when the engine failed
  under it), ``requests_rejected_total{reason}`` (429 / 503),
  histograms ``time_to_first_token_seconds``, ``time_per_output_token_seconds`` (the gaps
  between a request's tokens after the first), ``e2e_request_latency_seconds``.

Each server has its own registry (no process-global state), so tests may start several.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "moelora_"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0)


class _EngineCollector:
    """Gauges and counters of the engine loop's latest snapshot."""

    def __init__(self, loop):
        self.loop = loop

    def collect(self):
        snap = self.loop.snapshot
        m = snap.metrics
        gauges = dict(requests_running=(m.running, "requests in the running batch"),
                      requests_waiting=(m.waiting, "requests admitted, waiting to run"),
                      kv_pages_used=(m.pages_used, "KV pages held by sequences"),
                      kv_pages_total=(m.pages_total, "KV pages in the pool"),
                      kv_page_size_tokens=(m.page_size, "tokens per KV page"),
                      lora_slots_used=(m.slots_used, "adapter slots holding an adapter"),
                      lora_slots_total=(m.slots_total, "adapter slots on the device"),
                      adapters_loaded=(len(snap.adapters), "adapters that can be requested"))
        for name, (value, doc) in gauges.items():
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        counters = dict(prompt_tokens=(m.prompt_tokens, "prompt tokens computed"),
                        generation_tokens=(m.output_tokens, "tokens generated"),
                        preemptions=(m.preemptions, "sequences preempted (recomputed later)"),
                        steps=(m.steps, "engine steps (forwards)"),
                        decode_steps=(m.decode_steps, "engine steps of decoding sequences "
                                      "only (no prompt chunk in the batch)"),
                        step_seconds=(m.step_seconds, "wall time of the engine's steps "
                                      "(scheduling, forward, outputs)"))
        for name, (value, doc) in counters.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        per = GaugeMetricFamily(PREFIX + "adapter_requests",
                                "requests of each adapter by state", labels=["adapter", "state"])
        done = CounterMetricFamily(PREFIX + "adapter_requests_finished",
                                   "requests of each adapter that finished", labels=["adapter"])
        for name, c in sorted(m.adapters.items()):
            per.add_metric([name, "running"], c.running)
            per.add_metric([name, "waiting"], c.waiting)
            done.add_metric([name], c.finished)
        yield per
        yield done


class ServerMetrics:
    """The registry of one server and the instruments its handlers record into."""

    def __init__(self, loop):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(loop))
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "HTTP generation requests by outcome",
                                ["model", "status"], registry=r)
        self.rejected = Counter(PREFIX + "requests_rejected",
                                "requests refused before admission", ["reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "arrival to first generated token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "gap between consecutive output tokens of a request",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "arrival to the last token", buckets=E2E_BUCKETS, registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
