"""Router metrics (vLLM's names with a `tandem:` prefix), recorded by wrapping the Backend.

Each app owns its CollectorRegistry: no import-time globals, and several apps (tests) coexist.
One router process serves each app, so no multiprocess mode is needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.backend import Backend, GenerateEvent, GenerateRequest

log = logging.getLogger("tandem.requests")

# Bucket edges follow vLLM's, trimmed to what a CPU box produces.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


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
    running: Gauge
    http_requests: Counter

    @classmethod
    def create(cls) -> RouterMetrics:
        r = CollectorRegistry()
        m = ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(f"tandem:{name}", doc, m, buckets=buckets, registry=r)

        return cls(
            registry=r,
            ttft=hist("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS),
            itl=hist("inter_token_latency_seconds", "Time between tokens.", ITL_BUCKETS),
            e2e=hist("e2e_request_latency_seconds", "Request latency.", E2E_BUCKETS),
            prefill_time=hist("request_prefill_time_seconds", "Prefill phase.", E2E_BUCKETS),
            decode_time=hist("request_decode_time_seconds", "Decode phase.", E2E_BUCKETS),
            prompt_tokens_hist=hist("request_prompt_tokens", "Prompt tokens.", TOKEN_BUCKETS),
            generation_tokens_hist=hist("request_generation_tokens", "Generated tokens.",
                                        TOKEN_BUCKETS),
            prompt_tokens=Counter("tandem:prompt_tokens", "Prompt tokens.", m, registry=r),
            generation_tokens=Counter("tandem:generation_tokens", "Generated tokens.", m,
                                      registry=r),
            success=Counter("tandem:request_success", "Finished requests.",
                            m + ["finished_reason"], registry=r),
            cache_queries=Counter("tandem:prefix_cache_queries",
                                  "Prompt tokens looked up in the prefix cache.", m, registry=r),
            cache_hits=Counter("tandem:prefix_cache_hits",
                               "Prompt tokens served from the prefix cache.", m, registry=r),
            running=Gauge("tandem:num_requests_running", "Requests in flight.", m, registry=r),
            http_requests=Counter("tandem:http_requests", "HTTP requests.",
                                  ["route", "method", "status"], registry=r),
        )


@dataclass(slots=True)
class _Timing:
    start: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    cached: int = 0
    finish: str | None = None


class MeteredBackend:
    """A Backend that records per-request metrics and a log line around another Backend."""

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

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        m, t = self.metrics, _Timing(time.perf_counter())
        m.running.labels(req.model).inc()
        try:
            async for ev in self.inner.generate(req):
                self._observe(req, t, ev)
                yield ev
        finally:
            m.running.labels(req.model).dec()
            self._finish(req, t)

    def _observe(self, req: GenerateRequest, t: _Timing, ev: GenerateEvent) -> None:
        now = time.perf_counter()
        if t.first is None:
            t.first = now
            t.cached = ev.num_cached_tokens or 0
            self.metrics.ttft.labels(req.model).observe(now - t.start)
        else:
            self.metrics.itl.labels(req.model).observe(now - t.last)
        t.last, t.tokens, t.finish = now, t.tokens + 1, ev.finish_reason or t.finish

    def _finish(self, req: GenerateRequest, t: _Timing) -> None:
        m, model, end = self.metrics, req.model, time.perf_counter()
        prompt = len(req.token_ids)
        m.prompt_tokens.labels(model).inc(prompt)
        m.prompt_tokens_hist.labels(model).observe(prompt)
        m.generation_tokens.labels(model).inc(t.tokens)
        m.generation_tokens_hist.labels(model).observe(t.tokens)
        m.cache_queries.labels(model).inc(prompt)
        m.cache_hits.labels(model).inc(t.cached)
        m.e2e.labels(model).observe(end - t.start)
        if t.first is not None:
            m.prefill_time.labels(model).observe(t.first - t.start)
            m.decode_time.labels(model).observe(end - t.first)
        reason = t.finish or "abort"
        m.success.labels(model, reason).inc()
        ttft = f"{t.first - t.start:.3f}s" if t.first is not None else "-"
        log.info("request %s model=%s prompt=%d cached=%d generated=%d ttft=%s total=%.3fs "
                 "finish=%s", req.request_id, model, prompt, t.cached, t.tokens, ttft,
                 end - t.start, reason)
