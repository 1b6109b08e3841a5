"""Router metrics (vLLM's names with a `tandem:` prefix) and the per-request log line.

Two sources, so that every count is the one the client was billed:

    MeteredBackend (per choice, around the Backend)      timings: TTFT, ITL, e2e, prefill, decode
    record_request (per HTTP request, after the response) tokens, finish reasons, cache hits, log

Counts come from the API layer's UsageCounter (request.state.usage, set by router/api/respond.py),
never from backend events: a `max_tokens: 0` echo runs one backend token that the API layer
drops, and a stop string ends a choice with "stop" although the backend never said so.

`tandem:request_queue_time_seconds` is measured by the workers (engine/runner.py: submission to
the first engine step that feeds the sequence), where the queue is; the router has none.

Each app owns its CollectorRegistry: no import-time globals, and several apps (tests) coexist.
One router process serves each app, so no multiprocess mode is needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.sequence import TokenEvent
from router.dispatch.backend import Backend, GenerateRequest
from router.output.collect import UsageCounter
from wire.http_metrics import HttpRequestCounts

log = logging.getLogger("tandem.requests")

# Bucket edges follow vLLM's, trimmed to what a CPU box produces.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ABORT = "abort"  # a choice that ended without a finish reason (client gone, error mid-stream)


@dataclass
class RouterMetrics:
    registry: CollectorRegistry
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    prefill_time: Histogram
    decode_time: Histogram
    prompt_tokens_hist: Histogram
    generation_tokens_hist: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    success: Counter
    cache_queries: Counter
    cache_hits: Counter
    in_flight: Gauge
    http: HttpRequestCounts

    @classmethod
    def create(cls) -> RouterMetrics:
        r = CollectorRegistry()
        m = ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(f"tandem:{name}", doc, m, buckets=buckets, registry=r)

        def counter(name, doc, labels=()):
            return Counter(f"tandem:{name}", doc, [*m, *labels], registry=r)

        http = HttpRequestCounts()
        r.register(http)
        return cls(
            registry=r,
            ttft=hist("time_to_first_token_seconds",
                      "Backend call to first token, per choice.", TTFT_BUCKETS),
            itl=hist("inter_token_latency_seconds", "Time between tokens.", ITL_BUCKETS),
            e2e=hist("e2e_request_latency_seconds",
                     "Backend call to last token, per choice.", E2E_BUCKETS),
            prefill_time=hist("request_prefill_time_seconds",
                              "Backend call to first token (lookup, queues, prefill, handoff).",
                              E2E_BUCKETS),
            decode_time=hist("request_decode_time_seconds", "First token to last token.",
                             E2E_BUCKETS),
            prompt_tokens_hist=hist("request_prompt_tokens", "Prompt tokens per request.",
                                    TOKEN_BUCKETS),
            generation_tokens_hist=hist("request_generation_tokens",
                                        "Generated tokens per request.", TOKEN_BUCKETS),
            prompt_tokens=counter("prompt_tokens", "Prompt tokens billed (usage.prompt_tokens)."),
            generation_tokens=counter("generation_tokens",
                                      "Generated tokens billed (usage.completion_tokens)."),
            success=counter("request_success", "Finished choices by finish reason.",
                            ["finished_reason"]),
            cache_queries=counter("prefix_cache_queries",
                                  "Prompt tokens looked up in the prefix cache."),
            cache_hits=counter("prefix_cache_hits",
                               "Prompt tokens served from the prefix cache (cached_tokens)."),
            in_flight=Gauge("tandem:router_requests_in_flight",
                            "Backend calls (choices) this router has open.", m, registry=r),
            http=http,
        )


def record_request(metrics: RouterMetrics, scope: dict, t0: float) -> None:
    """Counts and logs one finished generation request; others (no usage) are skipped.

    A request refused before any token (429, 503, 400) counts nothing here: the HTTP counter
    has it. Choices that never finished count as "abort".
    """
    state = scope.get("state") or {}
    usage: UsageCounter | None = state.get("usage")
    plans: Sequence | None = state.get("plans")
    if usage is None or not plans or usage.first_update_at is None:
        return
    model, u, end = plans[0].request.model, usage.usage(), time.perf_counter()
    cached = usage.cached_tokens  # the true count, even when clients are told 0
    metrics.prompt_tokens.labels(model).inc(u.prompt_tokens)
    metrics.prompt_tokens_hist.labels(model).observe(u.prompt_tokens)
    metrics.generation_tokens.labels(model).inc(u.completion_tokens)
    metrics.generation_tokens_hist.labels(model).observe(u.completion_tokens)
    metrics.cache_queries.labels(model).inc(u.prompt_tokens)
    metrics.cache_hits.labels(model).inc(cached)
    reasons = [usage.finish_reasons.get(p.index, ABORT) for p in plans]
    for reason in reasons:
        metrics.success.labels(model, reason).inc()
    log.info("request %s model=%s prompt=%d cached=%d generated=%d ttft=%.3fs total=%.3fs "
             "finish=%s", state.get("request_id", "-"), model, u.prompt_tokens, cached,
             u.completion_tokens, usage.first_update_at - t0, end - t0, ",".join(reasons))


@dataclass(slots=True)
class _Timing:
    start: float
    first: float | None = None
    last: float | None = None


class MeteredBackend:
    """A Backend that records per-choice timings around another Backend."""

    def __init__(self, inner: Backend, metrics: RouterMetrics):
        self.inner = inner
        self.metrics = metrics

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def workers(self) -> list[dict]:
        return await self.inner.workers()

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        return self._metered(req, self.inner.generate(req))

    def generate_group(self, reqs: Sequence[GenerateRequest]) -> list[AsyncIterator[TokenEvent]]:
        return [self._metered(r, it) for r, it in zip(reqs, self.inner.generate_group(reqs),
                                                      strict=True)]

    async def _metered(self, req: GenerateRequest, events: AsyncIterator[TokenEvent]
                       ) -> AsyncIterator[TokenEvent]:
        m, t = self.metrics, _Timing(time.perf_counter())
        m.in_flight.labels(req.model).inc()
        try:
            async with aclosing(events):  # closed now, not when collected: that stops the work
                async for ev in events:
                    self._observe(req, t)
                    yield ev
        finally:
            m.in_flight.labels(req.model).dec()
            self._finish(req, t)

    def _observe(self, req: GenerateRequest, t: _Timing) -> None:
        now = time.perf_counter()
        if t.first is None:
            t.first = now
            self.metrics.ttft.labels(req.model).observe(now - t.start)
        else:
            self.metrics.itl.labels(req.model).observe(now - t.last)
        t.last = now

    def _finish(self, req: GenerateRequest, t: _Timing) -> None:
        if t.first is None:
            return  # refused or failed before any token: no latency to speak of
        m, model, end = self.metrics, req.model, time.perf_counter()
        m.e2e.labels(model).observe(end - t.start)
        m.prefill_time.labels(model).observe(t.first - t.start)
        m.decode_time.labels(model).observe(end - t.first)
