"""A circuit breaker per worker: request failures, not health probes, open it.

    closed --K consecutive failures--> open --cooldown passed--> half-open
      ^                                  ^                           |
      |                                  '-- trial failed (cooldown doubles)
      '------------------- trial succeeded --------------------------'

Probes decide whether a worker is up; the circuit catches a worker that answers /health but
fails requests, so it stops taking traffic for a while instead of failing every request sent to
it. While half-open exactly one request (the trial) may be in flight on it.
"""

from __future__ import annotations

from dataclasses import dataclass

FAILURE_THRESHOLD = 3  # consecutive failed requests before the circuit opens
COOLDOWN_S = 5.0  # first open period; a worker restart under load takes about this long
MAX_COOLDOWN_S = 60.0


@dataclass(slots=True)
class Circuit:
    threshold: int = FAILURE_THRESHOLD
    base_cooldown_s: float = COOLDOWN_S
    max_cooldown_s: float = MAX_COOLDOWN_S
    failures: int = 0  # consecutive failed requests
    open_until: float = 0.0  # monotonic seconds; 0.0 while closed
    cooldown_s: float = COOLDOWN_S  # the next open period
    trial: bool = False  # a half-open trial request is in flight
    opened_total: int = 0

    def state(self, now: float) -> str:
        if self.open_until == 0.0:
            return "closed"
        return "open" if now < self.open_until else "half_open"

    def available(self, now: float) -> bool:
        """May a request be sent now?"""
        state = self.state(now)
        return state == "closed" or (state == "half_open" and not self.trial)

    def on_lease(self, now: float) -> bool:
        """A request starts; True if it is the half-open trial (the caller ends it)."""
        if self.state(now) != "half_open":
            return False
        self.trial = True
        return True

    def on_success(self) -> None:
        self.failures, self.open_until, self.trial = 0, 0.0, False
        self.cooldown_s = self.base_cooldown_s

    def on_failure(self, now: float) -> None:
        was_trial = self.state(now) == "half_open"
        self.failures += 1
        self.trial = False
        if was_trial or self.failures >= self.threshold:
            self.open_until = now + self.cooldown_s
            self.cooldown_s = min(self.cooldown_s * 2, self.max_cooldown_s)
            self.opened_total += 1

    def reset(self) -> None:
        """A new process behind the URL: its predecessor's failures say nothing about it."""
        self.on_success()
