"""Server-sent events and client-disconnect handling.

    data: {chunk}\n\n ... data: {chunk}\n\n data: [DONE]\n\n

A stream is "primed" before the 200 goes out: we wait for the first update so that a backend
that is down or full still gets a proper 503/429, not a broken stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any, TypeVar

from router.errors import api_error_from
from wire.streaming import ClosingStreamingResponse

log = logging.getLogger(__name__)
T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"
# no-cache and no proxy buffering: tokens should reach the client as they are made.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class SSEResponse(ClosingStreamingResponse):
    """Closing its body on every exit (the client leaving included) cancels the backend work
    behind it now rather than when the garbage collector gets to it."""

    media_type = "text/event-stream"


async def prime(source: AsyncIterator[T]) -> AsyncIterator[T]:
    """The same items, but the first one is awaited now (its errors raise here)."""
    try:
        first = await source.__anext__()
    except BaseException:
        await source.aclose()  # type: ignore[attr-defined]
        raise

    async def chained() -> AsyncIterator[T]:
        try:
            yield first
            async for item in source:
                yield item
        finally:
            await source.aclose()  # type: ignore[attr-defined]

    return chained()


async def sse_body(
    events: AsyncIterator[Iterable[dict[str, Any]]],
) -> AsyncIterator[bytes]:
    """Payload batches -> SSE bytes, then [DONE]; an error mid-stream becomes an error event
    and ends the stream (no [DONE]: the stream did not complete)."""
    try:
        async for batch in events:
            for payload in batch:
                yield sse_event(payload)
    except Exception as exc:
        err = api_error_from(exc)
        log.warning("stream failed after it started: %s", err.message)
        yield sse_event(err.body())
        return
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    yield SSE_DONE
