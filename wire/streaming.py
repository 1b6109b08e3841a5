"""The one streaming response every service uses: it closes its body iterator on every exit.

Starlette leaves an unfinished async generator to the garbage collector when the client goes
away or the server shuts down, so the work behind it (a backend stream, an engine sequence
holding a slot) would run on until then. This response closes the body now, then runs
`on_close` (a worker releases its admission ticket there). `unless_disconnected` covers the
time before a response starts: work that a gone client was waiting for is cancelled.

With `send_timeout_s`, a client that stops reading is cut off too: once its socket buffer is
full the server's `send` blocks, and a send that blocks that long ends the response (the
server then closes the connection, since the body is incomplete).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing, suppress
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)
T = TypeVar("T")


class SendTimedOut(Exception):
    """The client accepted no data for `send_timeout_s`."""


class ClosingStreamingResponse(StreamingResponse):
    def __init__(self, content, *, on_close: Callable[[], None] | None = None,
                 send_timeout_s: float | None = None, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with aclosing(self.body_iterator):  # type: ignore[type-var]
                await super().__call__(scope, receive, self._bounded(send))
        except SendTimedOut:
            log.info("client read nothing for %g s; stream cut off", self.send_timeout_s)
        finally:
            if self.on_close is not None:
                self.on_close()

    def _bounded(self, send: Send) -> Send:
        if self.send_timeout_s is None:
            return send
        limit = self.send_timeout_s

        async def bounded(message: Message) -> None:
            try:
                async with asyncio.timeout(limit):
                    await send(message)
            except TimeoutError:
                raise SendTimedOut() from None

        return bounded


async def with_keepalive(lines: AsyncGenerator[str], every_s: float,
                         alive: Callable[[], bool] = lambda: True) -> AsyncGenerator[str]:
    """`lines`, plus a blank line whenever none came for `every_s` and `alive()` holds, so that
    the reader's read timeout measures a silent peer, not a request waiting its turn: a decode
    call can sit in its worker's queue behind long sequences for minutes. `alive` is the
    work's own progress (a worker's: its engine thread turned lately), so a hung engine still
    falls silent. NDJSON readers skip blank lines.

    The next line is awaited in a task (awaiting `anext` under a timeout would cancel it, and
    with it the generator); closing this cancels that task, then closes `lines`. The task costs
    ~15 us per line (measured on a 2-vCPU Xeon): ~2 ms a second at 120 tokens/s served."""
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(lines))
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                if alive():
                    yield "\n"
                continue
            pending = None
            try:
                line = done.pop().result()
            except StopAsyncIteration:
                return
            yield line
    finally:
        if pending is not None:
            pending.cancel()
            try:
                with suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
            except Exception:  # noqa: BLE001 - it failed after its reader left: nobody to tell
                log.info("a closed stream's source had failed", exc_info=True)
        await lines.aclose()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(
    request: Request, work: Awaitable[T], discard: Callable[[T], Awaitable[object]] | None = None
) -> T | None:
    """Run `work`, cancelling it (and so the backend calls) if the client goes away first.
    The body has been read already, so the next receive() can only be the disconnect.

    A cancelled `work` is awaited to its end: work that finished anyway (the cancel came too
    late) hands its result to `discard` (e.g. closing a primed stream), never to nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not watcher.done() or watcher.cancelled():
        return task.result()  # the work ended first (its error raises here)
    log.info("client disconnected; %s cancelled", request.url.path)
    try:
        result = await asyncio.shield(task)
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - nobody is left to tell
        return None
    if discard is not None:
        await discard(result)
    return None
