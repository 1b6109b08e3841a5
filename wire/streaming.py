"""The one streaming response every service uses: it closes its body iterator on every exit.

Starlette leaves an unfinished async generator to the garbage collector when the client goes
away or the server shuts down, so the work behind it (a backend stream, an engine sequence
holding a slot) would run on until then. This response closes the body now, then runs
`on_close` (a worker releases its admission ticket there).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStreamingResponse(StreamingResponse):
    def __init__(self, content, *, on_close: Callable[[], None] | None = None, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with aclosing(self.body_iterator):  # type: ignore[type-var]
                await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()
