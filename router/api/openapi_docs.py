"""`responses=` declarations for /openapi.json: the SSE body and the error envelope."""

from __future__ import annotations

from typing import Any

from router.protocol.common import SSE_DESCRIPTION, ErrorResponse

_ERRORS = {
    400: "invalid request (`param` names the field), or `context_length_exceeded`",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "body over the router's `max_body_bytes`",
    415: "body is not `application/json`",
    429: "overloaded; see `Retry-After`",
    503: "no worker available",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": _ERRORS[c]} for c in codes}


def generation_responses() -> dict[int | str, dict[str, Any]]:
    """200 is JSON, or SSE when `stream` is true; plus every error a generation can meet."""
    ok: dict[str, Any] = {
        "description": "the completion (JSON), or " + SSE_DESCRIPTION,
        "content": {"text/event-stream": {"schema": {"type": "string", "format": "event-stream"}}},
    }
    return {200: ok, **error_responses(400, 401, 404, 413, 415, 429, 503)}
