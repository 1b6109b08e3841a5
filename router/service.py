"""Assembles the production router: the OpenAI app over the worker dispatcher, with metrics,
/ready, /workers and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router import routes_ops
from router.app import create_app
from router.dispatch import DisaggregatedBackend
from router.metrics import MeteredBackend, RouterMetrics
from router.settings import RouterSettings


class PoolCollector:
    """Worker health and load, read from the pool at scrape time (no state copied)."""

    def __init__(self, backend: DisaggregatedBackend):
        self.backend = backend

    def collect(self):
        up = GaugeMetricFamily("tandem:worker_up", "1 if the worker passes health probes.",
                               labels=["url", "role"])
        inflight = GaugeMetricFamily("tandem:worker_inflight_requests",
                                     "Requests this router has open on the worker.",
                                     labels=["url", "role"])
        for w in self.backend.pool.workers() if self.backend.pool else []:
            up.add_metric([w.url, w.role], 1.0 if w.healthy else 0.0)
            inflight.add_metric([w.url, w.role], float(w.inflight))
        failovers = CounterMetricFamily("tandem:worker_failovers",
                                        "Worker calls retried on another worker.",
                                        value=self.backend.failovers_total)
        return [up, inflight, failovers]


class HttpMetricsMiddleware:
    """Counts requests by route template, method and status (pure ASGI: streaming-safe)."""

    def __init__(self, app, metrics: RouterMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.http_requests.labels(path, scope["method"], str(status["code"])).inc()


def metrics_router(metrics: RouterMetrics) -> APIRouter:
    routes = APIRouter()

    @routes.get("/metrics", include_in_schema=False)
    async def scrape(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return routes


def build_router_app(settings: RouterSettings) -> FastAPI:
    dispatcher = DisaggregatedBackend(settings)
    metrics = RouterMetrics.create()
    metrics.registry.register(PoolCollector(dispatcher))
    app = create_app(settings, MeteredBackend(dispatcher, metrics),
                     extra_routers=[routes_ops.routes, metrics_router(metrics)])
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    return app
