"""Operator endpoints: /ready (readiness for load balancers and compose) and /workers."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

routes = APIRouter()


@routes.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 when at least one healthy prefill (if any are configured) and decode worker exist."""
    backend = request.app.state.backend
    if await backend.ready():
        return JSONResponse({"status": "ready"})
    workers = await backend.workers()
    return JSONResponse({"status": "not ready", "workers": workers}, status_code=503)


@routes.get("/workers")
async def workers(request: Request) -> dict:
    return {"workers": await request.app.state.backend.workers()}
