"""Per-app state and the small dependencies every route shares."""

from __future__ import annotations

import email.message
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from router.dispatch.backend import Backend, InflightGate
from router.errors import APIError, model_not_found
from router.model_info import ServedModel
from router.settings import RouterSettings

log = logging.getLogger(__name__)

# An incoming X-Request-Id is echoed in logs and headers: keep it short and printable.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass(slots=True)
class RouterState:
    """What the lifespan builds once per app; routes reach it through `State`."""

    settings: RouterSettings
    backend: Backend
    models: dict[str, ServedModel]
    inflight: InflightGate  # backend calls open across the app (settings.max_inflight_choices)

    def model(self, name: str | None) -> ServedModel:
        """By served name; None means the first (default) model."""
        if name is None:
            return next(iter(self.models.values()))
        found = self.models.get(name)
        if found is None:
            raise model_not_found(name)
        return found


def get_state(request: Request) -> RouterState:
    return request.app.state.tandem


State = Annotated[RouterState, Depends(get_state)]


def _request_id(request: Request, prefix: str) -> str:
    """The completion's id, always ours (`cmpl-<uuid4 hex>`): it also names the worker calls,
    their engine sequences and the KV tail block, so a client that picked it could collide
    with another. A client's own X-Request-Id is only logged and echoed back in the header."""
    rid = f"{prefix}-{uuid.uuid4().hex}"
    sent = request.headers.get("x-request-id", "")
    echo = sent if _CLIENT_ID.match(sent) else rid
    if echo != rid:
        log.info("%s: client X-Request-Id %s", rid, sent)
    request.state.request_id = rid  # logs (router/metrics.py)
    request.state.echo_request_id = echo  # the X-Request-Id response header, errors too
    return rid


def completion_request_id(request: Request) -> str:
    return _request_id(request, "cmpl")


def chat_request_id(request: Request) -> str:
    return _request_id(request, "chatcmpl")


def dag_request_id(request: Request) -> str:
    return _request_id(request, "dag")


CompletionId = Annotated[str, Depends(completion_request_id)]
DagId = Annotated[str, Depends(dag_request_id)]
ChatId = Annotated[str, Depends(chat_request_id)]


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON (FastAPI would otherwise call it a bad body)."""
    message = email.message.Message()
    message["content-type"] = request.headers.get("content-type", "")
    subtype = message.get_content_subtype()
    if message.get_content_maintype() != "application" or not (
        subtype == "json" or subtype.endswith("+json")
    ):
        raise APIError(
            415, "The request body must be JSON, sent with `Content-Type: application/json`.",
            code="unsupported_media_type",
        )


JsonBody = Depends(require_json)
