"""One worker as the router's pool sees it (router/dispatch/pool.py): health, load, identity,
its resident-page summary and its circuit breaker (kvstore/breaker.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.breaker import Breaker
from router.dispatch.kv_route import ResidentView
from wire.internal_api import WorkerHealth

FAILURE_THRESHOLD = 3  # consecutive failed requests before the circuit opens
COOLDOWN_S = 5.0  # first open period; a worker restart under load takes about this long
MAX_COOLDOWN_S = 60.0  # a worker that keeps failing still gets a trial request once a minute


def worker_breaker(url: str, clock: Callable[[], float] = time.monotonic) -> Breaker:
    """Request failures, not health probes, open it. mark_failed logs the opening itself."""
    return Breaker(f"worker {url}", COOLDOWN_S, MAX_COOLDOWN_S, clock,
                   threshold=FAILURE_THRESHOLD, log_level=logging.DEBUG)


@dataclass(slots=True)
class WorkerInfo:
    url: str
    role: str  # "prefill" | "decode"
    model: str | None = None  # the served model it runs, once a probe told (None: not yet)
    healthy: bool = False
    failures: int = 0  # consecutive failed probes
    inflight: int = 0  # requests this router has open on it
    health: WorkerHealth | None = None
    last_ok: float = 0.0
    discovered: bool = False  # learned from Redis membership rather than configured
    missing_scans: int = 0  # membership listings in a row without its ad
    instance_id: str = ""  # the process behind the URL, once a probe told
    alias_of: str | None = None  # the URL this process is reached by instead (never picked)
    resident: ResidentView | None = None  # its device's resident pages (KV-aware routing)
    breaker: Breaker = field(init=False)

    def __post_init__(self) -> None:
        self.breaker = worker_breaker(self.url)

    def summary(self) -> dict:
        h = self.health
        return {
            "url": self.url, "role": self.role, "model": self.model, "healthy": self.healthy,
            "inflight": self.inflight,
            "running": h.running if h else None, "pid": h.pid if h else None,
            "failures": self.failures, "counters": h.counters if h else {},
            "circuit": self.breaker.state(), "discovered": self.discovered,
            "instance_id": self.instance_id, "alias_of": self.alias_of,
            "kv_summary_version": self.resident.version if self.resident else None,
        }


def load_key(w: WorkerInfo) -> tuple[int, int]:
    """Least loaded first: this router's requests in flight, then the worker's own count."""
    return w.inflight, w.health.running if w.health else 0
