"""Parse and validate a large JSON body on a thread, not on the event loop.

FastAPI parses the body (`request.json()`) and validates it against the route's model on the
event loop. For a body near the 8 MiB limit (a 1M-entry token list) that is ~70 ms of
json.loads plus ~95 ms of validation (measured on the dev box), during which every other
request, stream and /health waits. A route of this class hands FastAPI a model instance built
by `model_validate_json` on a thread; FastAPI then accepts the instance as is (pydantic does
not revalidate instances). A body that fails validation comes back as plain JSON, so FastAPI's
own validation reports the error exactly as it always does (that path stays on the loop).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

# Under this, parsing costs less than a thread hop (~50 us per KiB of JSON here).
OFFLOAD_BYTES = 64 * 1024


class _ThreadParsedRequest(Request):
    model: type[BaseModel] | None = None

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            raw = await self.body()
            if len(raw) < OFFLOAD_BYTES or self.model is None:
                self._json = json.loads(raw)
            else:
                self._json = await asyncio.to_thread(_parse, self.model, raw)
        return self._json


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        return json.loads(raw)  # FastAPI validates again and words the error itself


class ThreadParsedRoute(APIRoute):
    """An APIRoute whose JSON body model is parsed off the event loop when it is large."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        annotation = self.body_field.field_info.annotation if self.body_field else None
        model = annotation if isinstance(annotation, type) and issubclass(
            annotation, BaseModel) else None

        async def route(request: Request) -> Response:
            parsed = _ThreadParsedRequest(request.scope, request.receive)
            parsed.model = model
            return await handler(parsed)

        return route
