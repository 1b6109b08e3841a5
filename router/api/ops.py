"""Operator endpoints: /ready (readiness for load balancers and compose; open, like /health)
and /workers (behind the API key when keys are set: it names every worker's URL)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from router.api.openapi_docs import error_responses
from router.auth import require_api_key

routes = APIRouter(tags=["ops"])

_READY: dict[int | str, dict[str, Any]] = {
    200: {"description": "ready", "content": {"application/json": {"example": {
        "status": "ready"}}}},
    503: {"description": "not ready: no healthy decode (or prefill) worker", "content": {
        "application/json": {"example": {"status": "not ready", "workers": []}}}},
}


@routes.get("/ready", responses=_READY)
async def ready(request: Request) -> JSONResponse:
    """200 when at least one healthy prefill (if any are configured) and decode worker exist."""
    backend = request.app.state.backend
    if await backend.ready():
        return JSONResponse({"status": "ready"})
    workers = await backend.workers()
    return JSONResponse({"status": "not ready", "workers": workers}, status_code=503)


@routes.get("/workers", responses=error_responses(401),
            dependencies=[Depends(require_api_key)])
async def workers(request: Request) -> dict:
    return {"workers": await request.app.state.backend.workers()}
