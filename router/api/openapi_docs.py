"""/openapi.json as the contract: `responses=` declarations (the SSE body, the error
envelope), and the document itself, fitted to this deployment.

The document says exactly what this server accepts and answers: the bearer scheme and the 401s
only when API keys are set, and token ids bounded by the served vocabulary when every served
model shares one (a field built on `TokenId` carries the `x-token-id` marker for this).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from router.protocol.common import SSE_DESCRIPTION, TOKEN_ID_MARK, ErrorResponse

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


def _drop_auth(spec: dict[str, Any]) -> None:
    """No keys configured: no scheme, no per-operation security, no 401 to expect."""
    spec.get("components", {}).pop("securitySchemes", None)
    for path in spec.get("paths", {}).values():
        for op in path.values():
            op.pop("security", None)
            op.get("responses", {}).pop("401", None)


def _no_422(spec: dict[str, Any]) -> None:
    """FastAPI declares 422 for every body or parameter; this server answers 400 instead
    (router/errors.py)."""
    for path in spec.get("paths", {}).values():
        for op in path.values():
            responses = op.get("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = {
                    "description": _ERRORS[400],
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                }
    for name in ("HTTPValidationError", "ValidationError"):
        spec.get("components", {}).get("schemas", {}).pop(name, None)


def _bound_token_ids(node: Any, vocab_size: int | None) -> None:
    """Replace each token-id marker with the vocabulary's bound (or drop it when unknown)."""
    if isinstance(node, dict):
        if node.pop(TOKEN_ID_MARK, False) and vocab_size is not None:
            node["maximum"] = vocab_size - 1
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)


def contract_openapi(app: FastAPI) -> dict[str, Any]:
    """The document for this app, built once the lifespan has loaded the models (the token-id
    bound needs them); cached from then on."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, summary=app.summary,
                       routes=app.routes)
    _no_422(spec)
    if not app.state.api_keys:
        _drop_auth(spec)
    state = getattr(app.state, "tandem", None)
    vocabs = {m.vocab_size for m in state.models.values()} if state is not None else set()
    _bound_token_ids(spec, vocabs.pop() if len(vocabs) == 1 else None)
    if state is not None:
        app.openapi_schema = spec
    return spec
