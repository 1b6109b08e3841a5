"""The router's FastAPI app: the OpenAI API over a `Backend`.

    create_app(settings, backend)           production (backend = the worker dispatcher)
    create_app(settings, FakeBackend(...))  tests

Hooks for the dispatch layer:
  - `extra_routers` are included as-is (/ready, /workers, /metrics). They are not behind the
    API key unless they add `Depends(router.auth.require_api_key)` themselves.
  - /openapi.json, /docs and /redoc are behind the API key when keys are set (/health is not);
    `app.state.api_keys` holds the parsed keys (router/auth.py).
  - `app.state.tandem` is the RouterState (settings, backend, models), `app.state.backend` the
    backend; `router.deps.State` is the dependency that reaches the former.
  - the backend's start()/close() run in the lifespan, after the models load.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from router.api import chat as routes_chat
from router.api import completions as routes_completions
from router.api import dag as routes_dag
from router.api import docs as routes_docs
from router.api import models as routes_models
from router.api import tokenizer as routes_tokenizer
from router.api.openapi_docs import contract_openapi
from router.auth import parse_api_keys
from router.deps import RouterState
from router.dispatch.backend import Backend, InflightGate
from router.errors import install_error_handlers
from router.limits import BodyLimitMiddleware
from router.model_info import ServedModel, load_from_settings
from router.settings import RouterSettings


def _by_name(models: Sequence[ServedModel]) -> dict[str, ServedModel]:
    named = {m.name: m for m in models}
    if len(named) != len(models) or not named:
        raise ValueError("served models need distinct names, and at least one")
    return named


def create_app(
    settings: RouterSettings,
    backend: Backend,
    models: list[ServedModel] | None = None,
    extra_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """`models=None` loads the settings' model (tokenizer and config only) at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = models if models is not None else await asyncio.to_thread(
            load_from_settings, settings)
        app.state.tandem = RouterState(settings, backend, _by_name(served),
                                       InflightGate(settings.max_inflight_choices))
        app.state.backend = backend
        await backend.start()
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(
        title="tandem",
        summary="OpenAI-compatible serving with disaggregated prefill and decode",
        version="0.1.0",
        lifespan=lifespan,
        # Served by routes_docs instead, behind the API key and fitted to this deployment.
        openapi_url=None, docs_url=None, redoc_url=None,
    )
    app.state.api_keys = parse_api_keys(settings.api_keys)  # a bad entry fails here, early
    app.openapi = lambda: contract_openapi(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.include_router(routes_models.health_router)
    app.include_router(routes_models.router)
    app.include_router(routes_completions.router)
    app.include_router(routes_chat.router)
    app.include_router(routes_dag.router)
    app.include_router(routes_tokenizer.router)
    app.include_router(routes_docs.router)
    for extra in extra_routers:
        app.include_router(extra)
    return app
