"""Assembles the production router: the OpenAI app over the worker dispatcher, with metrics,
/ready, /workers and /metrics."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router.api import ops as routes_ops
from router.app import create_app
from router.auth import require_api_key
from router.dispatch.backend import Backend
from router.dispatch.disaggregated import DisaggregatedBackend
from router.metrics import MeteredBackend, RouterMetrics, record_request
from router.model_info import ServedModel
from router.settings import RouterSettings
from wire.http_metrics import HttpMetricsMiddleware


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
        return [up, inflight, failovers, *self._routes()]

    def _routes(self) -> list:
        """KV-aware routing's choices (router/dispatch/kv_route.py): matched / prompt tokens
        is the share of routed prompts the chosen worker held on its device."""
        decisions = CounterMetricFamily(
            "tandem:router_route_decisions", "Worker choices by KV-aware routing, by why: "
            "prefix (it held the most), load (nobody held any), balance (loads too skewed).",
            labels=["role", "reason"])
        prompt = CounterMetricFamily("tandem:router_route_prompt_tokens",
                                     "Prompt tokens of the requests KV-aware routing placed.",
                                     labels=["role"])
        matched = CounterMetricFamily(
            "tandem:router_route_matched_tokens",
            "Of those, tokens the chosen worker's resident-page summary held.", labels=["role"])
        stats = self.backend.pool.router.stats if self.backend.pool else None
        for (role, reason), n in (stats.decisions.items() if stats else ()):
            decisions.add_metric([role, reason], n)
        for role, n in (stats.prompt_tokens.items() if stats else ()):
            prompt.add_metric([role], n)
            matched.add_metric([role], stats.matched_tokens.get(role, 0))
        return [decisions, prompt, matched]


def metrics_router(metrics: RouterMetrics) -> APIRouter:
    routes = APIRouter()

    # Behind the API key when keys are set: it names workers and counts every tenant's traffic.
    @routes.get("/metrics", include_in_schema=False, dependencies=[Depends(require_api_key)])
    async def scrape(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return routes


def create_metered_app(settings: RouterSettings, backend: Backend, metrics: RouterMetrics,
                       models: list[ServedModel] | None = None,
                       extra_routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The OpenAI app over `backend` with metrics: per-choice timings around the backend, HTTP
    counts and per-request token accounting in a middleware, and GET /metrics."""
    app = create_app(settings, MeteredBackend(backend, metrics), models,
                     extra_routers=[*extra_routers, metrics_router(metrics)])
    app.add_middleware(HttpMetricsMiddleware, counts=metrics.http,
                       on_done=partial(record_request, metrics))
    return app


def build_router_app(settings: RouterSettings) -> FastAPI:
    dispatcher = DisaggregatedBackend(settings)
    metrics = RouterMetrics.create()
    metrics.registry.register(PoolCollector(dispatcher))
    return create_metered_app(settings, dispatcher, metrics, extra_routers=[routes_ops.routes])
