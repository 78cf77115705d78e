"""Every Prometheus metric afa-serve exports: these names are the dashboards' and alerts' contract.

Each metric has the label `model_name` (the served name). Three kinds of sources:

- Counters and gauges that mirror the engine (`EngineCollector`) are read from
  `engine.stats()` at scrape time, so they are exact and the same for every engine:
    afa_serve_spec_decode_drafts_total              draft/verify steps that proposed tokens
    afa_serve_spec_decode_draft_tokens_total        tokens the draft proposed
    afa_serve_spec_decode_accepted_tokens_total     proposed tokens the target kept
    afa_serve_spec_decode_accepted_tokens_per_pos_total{position}
                                                    kept at draft position i (0-based)
    afa_serve_prompt_tokens_total                   prompt tokens prefilled (n times for n choices)
    afa_serve_generation_tokens_total               output tokens generated
    afa_serve_num_requests_running                  gauge: requests being decoded
    afa_serve_num_requests_waiting                  gauge: requests queued
    afa_serve_spec_decode_num_drafted_tokens        histogram: tokens drafted per step (0 .. k;
                                                    0 = plain), torch engine
    afa_serve_spec_decode_draft_cost_ratio          gauge: measured c, torch engine
    afa_serve_spec_decode_verify_cost_ratio         gauge: measured v(k + 1), torch engine
- What the HTTP layer sees (`ServerMetrics`):
    afa_serve_requests_total{endpoint,status}          API requests answered, by status code
    afa_serve_time_to_first_token_seconds              arrival -> first output token
    afa_serve_request_time_per_output_token_seconds    (last - first token) / (tokens - 1), per
                                                       token: one speculative step yields several
    afa_serve_inter_token_latency_seconds              between successive output chunks (deltas)
    afa_serve_e2e_request_latency_seconds              arrival -> last token
    afa_serve_request_queue_time_seconds               arrival -> scheduled
- What is served: afa_serve_model_info{target,draft,num_speculative_tokens,engine,dtype,device} 1.

Derived figures for dashboards: acceptance rate = accepted / draft tokens; mean acceptance
length = 1 + accepted / drafts; share of output from the draft = accepted / generation tokens.
Process metrics (process_*) come from prometheus_client's ProcessCollector.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from afa_serve.engine.base import Delta, Engine

disable_created_metrics()  # no *_created series: they double the exposition for no use

PREFIX = "afa_serve"
MODEL_LABEL = "model_name"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets (seconds), wide enough for a 2-core CPU and fine enough for a GPU.
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
                  0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                        5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                    60.0, 120.0, 240.0, 480.0, 960.0)


class EngineCollector(Collector):
    """The engine's own counters and gauges, read from `engine.stats()` at each scrape."""

    def __init__(self, engine: Engine, model_name: str, num_speculative_tokens: int):
        self._engine = engine
        self._model_name = model_name
        self._k = num_speculative_tokens
        # the torch engine measures its steps' draft lengths and costs; vLLM's does not say
        self._measures_steps = engine.info.engine == "torch"

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        spec = stats.spec

        def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=[MODEL_LABEL])
            family.add_metric([self._model_name], value)
            return family

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=[MODEL_LABEL])
            family.add_metric([self._model_name], value)
            return family

        yield counter("spec_decode_drafts", "Draft/verify steps that proposed tokens.",
                      spec.num_drafts)
        yield counter("spec_decode_draft_tokens", "Tokens proposed by the draft.",
                      spec.num_draft_tokens)
        yield counter("spec_decode_accepted_tokens", "Proposed tokens accepted by the target.",
                      spec.num_accepted_tokens)
        per_position = CounterMetricFamily(
            f"{PREFIX}_spec_decode_accepted_tokens_per_pos",
            "Accepted draft tokens by their position in the draft (0-based).",
            labels=[MODEL_LABEL, "position"],
        )
        accepted = spec.accepted_per_position
        for position in range(max(self._k, len(accepted))):
            count = accepted[position] if position < len(accepted) else 0
            per_position.add_metric([self._model_name, str(position)], count)
        yield per_position
        if self._measures_steps:  # NaN until the engine has measured
            yield self._draft_lengths(spec.steps_by_draft_length)
            yield gauge("spec_decode_draft_cost_ratio",
                        "c: one draft forward over one plain target step, as measured.",
                        math.nan if stats.draft_cost_ratio is None else stats.draft_cost_ratio)
            yield gauge("spec_decode_verify_cost_ratio",
                        "v: a target pass over k + 1 tokens over a one-token pass, as measured.",
                        math.nan if stats.verify_cost_ratio is None else stats.verify_cost_ratio)
        yield counter("prompt_tokens", "Prompt tokens prefilled.", stats.prompt_tokens)
        yield counter("generation_tokens", "Output tokens generated.", stats.generation_tokens)
        yield gauge("num_requests_running", "Requests being decoded.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting in the queue.", stats.num_waiting)


    def _draft_lengths(self, steps_by_length: list[int]) -> HistogramMetricFamily:
        """Decoding steps by the tokens they drafted: buckets le = 0 .. k (0: plain steps)."""
        counts = steps_by_length + [0] * (self._k + 1 - len(steps_by_length))
        buckets, cumulative = [], 0
        for length, count in enumerate(counts):
            cumulative += count
            buckets.append((str(length), cumulative))
        buckets.append(("+Inf", cumulative))
        family = HistogramMetricFamily(
            f"{PREFIX}_spec_decode_num_drafted_tokens",
            "Tokens drafted per decoding step: the k the speculation policy chose, cut short "
            "where the draft was unsure (0: a plain step).",
            labels=[MODEL_LABEL],
        )
        family.add_metric([self._model_name], buckets,
                          sum(n * count for n, count in enumerate(counts)))
        return family


class RequestObserver:
    """Feeds one engine request's deltas into the latency histograms, as they arrive."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics
        self._last_chunk_at: float | None = None

    def observe(self, delta: Delta, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        timings, metrics = delta.timings, self._metrics
        if self._last_chunk_at is None:
            if timings.queue_time_s is not None:
                metrics.queue_time.observe(timings.queue_time_s)
            if timings.first_token is not None:
                metrics.time_to_first_token.observe(timings.first_token - timings.arrival)
        elif delta.token_ids:
            metrics.inter_token_latency.observe(now - self._last_chunk_at)
        if delta.token_ids:
            self._last_chunk_at = now
        if delta.finished and timings.finished is not None:
            metrics.e2e_latency.observe(timings.finished - timings.arrival)
            if delta.num_generated_tokens > 1 and timings.first_token is not None:
                metrics.time_per_output_token.observe(
                    (timings.finished - timings.first_token) / (delta.num_generated_tokens - 1)
                )


class ServerMetrics:
    """The metrics of one served model, in their own registry (several apps can share a process)."""

    def __init__(self, engine: Engine, registry: CollectorRegistry | None = None):
        info = engine.info
        self.model_name = info.name
        self.registry = registry if registry is not None else CollectorRegistry()
        registry = self.registry
        labels = [MODEL_LABEL]

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(f"{PREFIX}_{name}", documentation, labels, buckets=buckets,
                               registry=registry)
            return metric.labels(self.model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first output token.",
            _FIRST_TOKEN_BUCKETS)
        self.time_per_output_token = histogram(
            "request_time_per_output_token_seconds",
            "Per request: (last token - first token) / (output tokens - 1).", _TOKEN_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between successive output chunks of a request.",
            _TOKEN_BUCKETS)
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last output token.",
            _REQUEST_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival to being scheduled.",
            _REQUEST_BUCKETS)
        self._requests = Counter(
            f"{PREFIX}_requests", "API requests answered, by endpoint and HTTP status.",
            [MODEL_LABEL, "endpoint", "status"], registry=registry)
        Info(f"{PREFIX}_model", "What is served: target, draft, k, engine.", labels,
             registry=registry).labels(self.model_name).info({
                 "target": info.target,
                 "draft": info.draft or "",
                 "num_speculative_tokens": str(info.num_speculative_tokens),
                 "engine": info.engine,
                 "speculation": info.speculation,
                 "dtype": info.dtype,
                 "device": info.device,
             })
        registry.register(EngineCollector(engine, self.model_name, info.num_speculative_tokens))
        ProcessCollector(registry=registry)

    def count_request(self, endpoint: str, status: int) -> None:
        self._requests.labels(self.model_name, endpoint, str(status)).inc()

    def observer(self) -> RequestObserver:
        return RequestObserver(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)
