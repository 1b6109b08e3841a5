"""The request body's size, enforced while it arrives: a pure ASGI middleware, so nothing
(FastAPI's body reading, JSON parsing) ever holds more than the limit.

    Content-Length over the limit      -> 413 at once, no body byte read
    chunks pass the limit as they come -> 413 after ~limit bytes (the rest is never read)

The per-request limits on what the body asks for (prompts, n, tokens, ...) are checked where
the request is planned (router/api/planning.py).
"""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import BodyTooLarge, too_large

log = logging.getLogger(__name__)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _log_refusal(limit: int, scope: Scope) -> None:
    log.info("refused a request body over %d bytes (%s %s)", limit, scope.get("method"),
             scope.get("path"))


async def _refuse(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    err = too_large(limit)
    await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            _log_refusal(self.max_bytes, scope)
            await _refuse(self.max_bytes, scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                _log_refusal(self.max_bytes, scope)
                raise BodyTooLarge(self.max_bytes)  # the app's handler answers 413
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:  # read after the response began: nothing left to tell the client
                raise
            await _refuse(self.max_bytes, scope, receive, send)
