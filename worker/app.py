"""A worker's FastAPI app skeleton: lifespan (engine thread, store, heartbeat), /health,
/metrics, the internal token on every service route, and OpenAI-shaped errors (worker/errors.py).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from wire.http_metrics import HttpMetricsMiddleware, HttpRequestCounts
from wire.internal_api import INTERNAL_TOKEN_HEADER, KVSummary, WorkerHealth
from worker.errors import WorkerError, install_error_handlers
from worker.lifecycle import Lifecycle
from worker.runtime import Worker, build_worker
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def get_worker(request: Request) -> Worker:
    return request.app.state.worker


def check_internal_token(request: Request) -> None:
    expected = request.app.state.worker.settings.internal_token
    if not expected:
        return  # only on loopback (WorkerSettings.check_exposure)
    given = request.headers.get(INTERNAL_TOKEN_HEADER, "")
    # Constant time: how long a wrong guess takes must not say how much of it was right.
    # Starlette reads header bytes as latin-1: encoding back gives the bytes that were sent.
    if not secrets.compare_digest(given.encode("latin-1"), expected.encode()):
        raise WorkerError(401, f"missing or wrong {INTERNAL_TOKEN_HEADER} header",
                          code="invalid_internal_token")


WorkerDep = Annotated[Worker, Depends(get_worker)]


def create_worker_app(settings: WorkerSettings, routes: APIRouter) -> FastAPI:
    settings.check_exposure()  # refuse to start open to the network
    http_counts = HttpRequestCounts()  # made before the registry, which the lifespan builds

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = build_worker(settings)
        worker.registry.register(http_counts)
        app.state.worker = worker
        lifecycle = Lifecycle(worker)  # heartbeat in Redis, drain on SIGTERM
        await lifecycle.start()
        log.info("%s worker ready on %s:%d (advertised as %s)", settings.role, settings.host,
                 settings.port, settings.advertised_url())
        try:
            yield
        finally:
            await lifecycle.stop()
            worker.runner.stop()
            worker.writer.shutdown(wait=True)
            worker.store.close()
            if worker.cold is not None:
                worker.cold.close()

    app = FastAPI(title=f"tandem {settings.role} worker", lifespan=lifespan)
    app.add_middleware(HttpMetricsMiddleware, counts=http_counts)
    install_error_handlers(app)

    @app.get("/health", response_model=WorkerHealth)
    async def health(worker: WorkerDep) -> WorkerHealth | JSONResponse:
        if worker.admission.draining:  # probes take it out of rotation; the body still reads
            return JSONResponse(worker.health().model_dump(), status_code=503)
        return worker.health()

    @app.get("/kv_summary", response_model=KVSummary,
             dependencies=[Depends(check_internal_token)])
    async def kv_summary(worker: WorkerDep) -> KVSummary:
        return worker.kv_summary()

    @app.get("/metrics", include_in_schema=False)
    async def metrics(worker: WorkerDep) -> Response:
        return Response(generate_latest(worker.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(routes, dependencies=[Depends(check_internal_token)])
    return app
