"""How a worker call can go wrong, and one request's record of it (its failover budget).

    WorkerRefused  the worker answered 429 (full) or 503 (draining): nothing ran, try another
                   worker; costs no budget.
    WorkerFailed   connection refused/reset, timeout, bad status, stream cut short: the worker
                   may be dead; costs one unit of budget and a strike on its circuit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

DEFAULT_RETRY_AFTER_S = 1


class WorkerFailed(Exception):
    """A worker call broke (connection, status, truncated stream)."""


class WorkerRefused(Exception):
    """The worker declined the request before doing any work."""

    def __init__(self, message: str, draining: bool, retry_after_s: int = DEFAULT_RETRY_AFTER_S):
        super().__init__(message)
        self.draining = draining
        self.retry_after_s = retry_after_s


def check_status(r: httpx.Response) -> None:
    """Raise WorkerRefused / WorkerFailed unless the worker answered 200."""
    if r.status_code == 200:
        return
    if r.status_code == 429:
        raw = r.headers.get("Retry-After", "")
        retry = int(raw) if raw.isdigit() else DEFAULT_RETRY_AFTER_S
        raise WorkerRefused("at capacity", draining=False, retry_after_s=max(1, retry))
    if r.status_code == 503:
        raise WorkerRefused("draining", draining=True)
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
