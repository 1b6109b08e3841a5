"""A worker's bounded admission: how many requests it holds, and when it says no.

    admitted = loading a prefix + waiting for a slot + running     (this worker's requests)
    new request, admitted >= max_slots + max_queue   -> 429 Retry-After (router tries another)
    any request while draining (SIGTERM)             -> 503 (router tries another)

A failover resume (it carries tokens the client has already seen) is admitted past the limit:
refusing it would fail a stream that is half delivered, and the engine queues it for a slot.
Everything here runs on the event loop thread, so the counter needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a slot frees when any running sequence finishes; on CPU that is seconds
IDLE_POLL_S = 0.05


@dataclass(slots=True)
class Admission:
    capacity: int  # max_slots + max_queue
    active: int = 0  # admitted requests not yet finished
    draining: bool = False

    def refusal(self, resume: bool = False, units: int = 1) -> JSONResponse | None:
        """The response that turns this request away, or None to admit it. `units`: the
        sequences it runs (n > 1 choices forked off one prompt run several)."""
        if self.draining:
            return _error(503, "worker is draining", "draining")
        if self.active + units > self.capacity and not resume:
            return _error(429, f"worker is at capacity ({self.capacity})", "at_capacity",
                          {"Retry-After": str(RETRY_AFTER_S)})
        return None

    def admit(self, units: int = 1) -> Ticket:
        return Ticket(self, units)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Bounded poll until nothing is admitted; True if that happened in time."""
        deadline = time.monotonic() + timeout_s
        while self.active > 0 and time.monotonic() < deadline:
            await asyncio.sleep(IDLE_POLL_S)
        return self.active == 0


class Ticket:
    """One admitted request's units; release() is idempotent, so every exit path may call it."""

    __slots__ = ("_admission", "_held")

    def __init__(self, admission: Admission, units: int = 1):
        self._admission = admission
        self._held = units
        admission.active += units

    def release(self, units: int | None = None) -> None:
        """Give back `units` (one fork ended) or everything still held."""
        units = self._held if units is None else min(units, self._held)
        self._held -= units
        self._admission.active -= units

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "server_error", "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
