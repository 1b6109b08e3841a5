"""The seam between the OpenAI API layer and whatever generates tokens.

The API layer (routes, validation, detokenization, stop strings, SSE) sees only this protocol.
The production backend dispatches to prefill/decode workers over HTTP
(router/dispatch/disaggregated.py); unit tests use a scripted fake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.sampling_params import SamplingParams
from engine.sequence import TokenEvent


@dataclass(slots=True)
class GenerateRequest:
    request_id: str
    model: str
    token_ids: list[int]  # the full prompt, already templated and tokenized
    params: SamplingParams  # seed is always set by the router (position-deterministic)
    cache_salt: str = ""  # per-tenant namespace for the prefix cache


class BackendError(Exception):
    """Base for failures the API layer maps to an HTTP status."""


class BackendUnavailable(BackendError):
    """No ready worker can take the request (HTTP 503)."""


class BackendOverloaded(BackendError):
    """Queues are full (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendRejected(BackendError):
    """The request is wrong in itself: a worker refused its content before doing any work
    (HTTP 400 to the client, with the worker's message). Nothing is retried."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class Backend(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Yields the engine's token events until one has a finish_reason (the first also
        carries num_cached_tokens and any prompt_logprobs). Closing the iterator cancels the
        work."""
        ...

    def generate_group(self, reqs: Sequence[GenerateRequest]) -> list[AsyncIterator[TokenEvent]]:
        """One iterator per request, as generate() gives, for the choices of one prompt (same
        token_ids, cache_salt and model; their own ids and params): the prompt is computed
        once for all of them. Each iterator may be closed on its own."""
        ...

    async def ready(self) -> bool: ...

    async def workers(self) -> list[dict[str, Any]]: ...


@dataclass(slots=True)
class InflightGate:
    """Counts the backend calls (choices) open at once across the router, so a burst of
    n=128 requests is refused at the door (429) instead of queueing inside the connection
    pool, where it would crowd out the requests already running. One per app."""

    limit: int
    open: int = 0

    def admit(self, n: int) -> Admission:
        """All `n` choices of a request, or none: BackendOverloaded when they would not fit."""
        if self.open + n > self.limit:
            raise BackendOverloaded(
                f"the router has {self.open} backend calls open (limit {self.limit})")
        self.open += n
        return Admission(self, n)


@dataclass(slots=True)
class Admission:
    """One request's share of the gate. Each choice gives its unit back when its backend
    iterator ends; `release_all` returns what is left (the request is over)."""

    gate: InflightGate
    held: int
    _released: int = field(default=0, init=False)

    def release(self, n: int = 1) -> None:
        n = min(n, self.held - self._released)
        self._released += n
        self.gate.open -= n

    def release_all(self) -> None:
        self.release(self.held)

    async def hold(self, source: AsyncIterator) -> AsyncIterator:
        """The same items; the choice's unit is given back when `source` ends or is closed."""
        try:
            async for item in source:
                yield item
        finally:
            try:
                await source.aclose()  # type: ignore[attr-defined]
            finally:
                self.release()
