"""How a worker call can go wrong, and one request's record of it (its failover budget).

    WorkerRefused  the worker answered 429 (full) or 503 (draining): nothing ran, try another
                   worker; costs no budget.
    WorkerFailed   connection refused/reset, timeout, bad status, stream cut short: the worker
                   may be dead; costs one unit of budget and a strike on its circuit.
    WorkerRejected the worker answered 400/404/413/422: the request is wrong in itself, and
                   would be on any worker. The client's error: no retry, no strike.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import httpx

from router.dispatch.kv_route import RoutePrefix

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 1
REJECTED = frozenset({400, 404, 413, 422})  # the request's own fault, not the worker's
BACKOFF_BASE_S = 0.05  # first retry delay; doubles per failure, capped, times U(1, 2) jitter
BACKOFF_MAX_S = 1.0


class WorkerFailed(Exception):
    """A worker call broke (connection, status, truncated stream)."""


class WorkerRefused(Exception):
    """The worker declined the request before doing any work."""

    def __init__(self, message: str, draining: bool, retry_after_s: int = DEFAULT_RETRY_AFTER_S):
        super().__init__(message)
        self.draining = draining
        self.retry_after_s = retry_after_s


class WorkerRejected(Exception):
    """The worker refused the request's content before doing any work (its OpenAI-shaped
    error says why)."""

    def __init__(self, status: int, message: str, param: str | None, code: str | None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


def _rejection(r: httpx.Response) -> WorkerRejected:
    """From the worker's `{"error": {"message", "type", "param", "code"}}`, or its raw text."""
    try:
        err = r.json()["error"]
        message, param, code = str(err["message"]), err.get("param"), err.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, param, code = r.text[:500] or f"status {r.status_code}", None, None
    return WorkerRejected(r.status_code, message, _text(param), _text(code))


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def check_status(r: httpx.Response) -> None:
    """Raise WorkerRefused / WorkerRejected / WorkerFailed unless the worker answered 200."""
    if r.status_code == 200:
        return
    if r.status_code == 429:
        raw = r.headers.get("Retry-After", "")
        retry = int(raw) if raw.isdigit() else DEFAULT_RETRY_AFTER_S
        raise WorkerRefused("at capacity", draining=False, retry_after_s=max(1, retry))
    if r.status_code == 503:
        raise WorkerRefused("draining", draining=True)
    if r.status_code in REJECTED:
        raise _rejection(r)
    if r.status_code == 401:
        # Every request would fail the same way: the router's --internal-token is not the
        # workers'. A failure (the worker leaves rotation), and loud.
        log.error("a worker refused the router's internal token (401): set the same "
                  "TANDEM_INTERNAL_TOKEN on the router and every worker")
    raise WorkerFailed(f"status {r.status_code}: {r.text[:200]}")


@dataclass(slots=True)
class RetryState:
    """One request's faults, shared by its prefill and decode hops."""

    budget: int  # failed calls that may be retried (--max-failovers)
    failures: int = 0
    failed: set[str] = field(default_factory=set)  # worker URLs whose call failed
    refused: set[str] = field(default_factory=set)  # URLs that refused since the last wait
    busy: int | None = None  # the largest Retry-After among 429s, if any
    streaming: bool = False  # the client holds tokens: waits for recovery instead of 4xx/5xx
    deadline: float | None = None  # monotonic; set when the request first waits for a worker
    model: str | None = None  # the served model whose workers it may use (None: any)
    prefix: RoutePrefix | None = None  # its prompt, for KV-aware routing (None: least loaded)

    @property
    def excluded(self) -> set[str]:
        return self.failed | self.refused

    def spend(self, url: str) -> bool:
        """Record a failed call; True if the budget allows another try."""
        self.failed.add(url)
        self.failures += 1
        return self.failures <= self.budget

    def refuse(self, url: str, e: WorkerRefused) -> None:
        self.refused.add(url)
        if not e.draining:
            self.busy = max(self.busy or 0, e.retry_after_s)


def backoff_s(failures: int) -> float:
    """Exponential with jitter, so retries of requests that failed together spread out."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1)) * (1 + random.random())
