"""HTTP request counts by route template, method and status, for every service's /metrics.

    app.add_middleware(HttpMetricsMiddleware, counts=counts)   # counts: HttpRequestCounts
    registry.register(counts)                                  # -> tandem:http_requests_total

The counts are a collector rather than a prometheus Counter so a worker can create them with its
app and register them once its registry exists (the registry is built in the lifespan).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily

log = logging.getLogger(__name__)

# Paths with no matching route (404s, scanners) share one label value, bounding cardinality.
UNMATCHED = "unmatched"


class HttpRequestCounts:
    """Owns the (route, method, status) -> count table; a prometheus collector."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()

    def inc(self, route: str, method: str, status: int) -> None:
        with self._lock:
            self._counts[(route, method, str(status))] += 1

    def collect(self):
        family = CounterMetricFamily("tandem:http_requests", "HTTP requests by route and status.",
                                     labels=["route", "method", "status"])
        with self._lock:
            items = sorted(self._counts.items())
        for labels, value in items:
            family.add_metric(list(labels), value)
        return [family]


class HttpMetricsMiddleware:
    """Pure ASGI (streaming-safe): the status is the one the response started with, and the
    count lands when the response (a whole SSE stream included) is done. `on_done(scope, t0)`
    runs then too (t0: perf_counter() at arrival), for accounting that needs the whole response.
    """

    def __init__(self, app, counts: HttpRequestCounts,
                 on_done: Callable[[dict, float], None] | None = None):
        self.app = app
        self.counts = counts
        self.on_done = on_done

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}  # an exception before the response started is a 500

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = getattr(scope.get("route"), "path", UNMATCHED)
            self.counts.inc(path, scope["method"], status["code"])
            if self.on_done is not None:
                try:
                    self.on_done(scope, t0)
                except Exception:  # accounting must never fail a request that was served
                    log.exception("request accounting failed")
