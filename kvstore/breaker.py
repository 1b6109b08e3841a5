"""A circuit breaker: after `threshold` consecutive failures a fallible thing is left alone for a
cooldown, then exactly one trial call may find out whether it is back.

    closed --threshold consecutive failures--> open --cooldown elapsed--> half_open
      ^                                         ^                             |
      |                                         '--- trial failed: cooldown --+
      |                                              doubles, up to max_s     |
      '------------ trial (or any call) succeeded: cooldown back to base_s ---'

In half_open, allow() lets exactly one caller through: the trial.

One class serves two users:
- kvstore tiers (disk, Redis; threshold 1). While a tier is open its calls answer "miss" at once,
  so a dead Redis costs a request nothing after the first bounded timeout.
- the router, one per worker (threshold 3, router/dispatch/pool.py). Probes decide whether a
  worker is up; the breaker catches one that answers /health but fails requests.

Rules for reports that are not the trial's: any success closes the breaker (the thing works); a
failure while the cooldown runs is counted but neither extends nor doubles it (that call began
before the breaker opened); a failure after the cooldown reopens it like a failed trial.
A trial that never reports (a caller that died, a lease ended without a verdict) lapses after
one cooldown and the next caller becomes the trial; `end_trial()` ends it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Breaker:
    """Thread-safe. Time comes from `clock` (monotonic seconds), so tests pass a fake one.
    The listener gets `up` on every closed<->open change, in order, under the breaker's lock
    (keep it short, and do not call back into the breaker)."""

    def __init__(self, name: str, base_s: float = 0.5, max_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, *, threshold: int = 1,
                 on_change: Callable[[bool], None] | None = None,
                 log_level: int = logging.WARNING) -> None:
        assert threshold >= 1 and 0 < base_s <= max_s
        self.name = name
        self._threshold = threshold
        self._base_s = base_s
        self._max_s = max_s
        self._clock = clock
        self._on_change = on_change
        self._log_level = log_level  # of the down/up lines; an owner that logs its own lowers it
        self._lock = threading.Lock()
        self._open_until: float | None = None  # clock seconds; None while closed
        self._trial_until = 0.0  # clock seconds; a trial is in flight until then
        self._cooldown_s = base_s  # the next open period
        self.consecutive = 0  # failures since the last success
        self.failures = 0  # all failures, ever
        self.opened_total = 0  # closed->open and half_open->open transitions

    @property
    def up(self) -> bool:
        return self._open_until is None

    def sibling(self, name: str) -> Breaker:
        """A fresh breaker with this one's settings and clock (a cluster tier keeps one per
        node), without its listener."""
        return Breaker(name, self._base_s, self._max_s, self._clock, threshold=self._threshold,
                       log_level=self._log_level)

    def set_listener(self, on_change: Callable[[bool], None] | None) -> None:
        self._on_change = on_change

    def state(self) -> str:
        """One of "closed", "open" (cooldown running), "half_open" (a trial may go, or is going)."""
        with self._lock:
            return self._state(self._clock())

    def available(self) -> bool:
        """Would allow() say yes now? Claims nothing."""
        with self._lock:
            return self._admits(self._clock())

    def allow(self) -> bool:
        """True if a call may go now: closed, or half-open and this caller becomes the trial."""
        with self._lock:
            now = self._clock()
            if not self._admits(now):
                return False
            if self._open_until is not None:
                self._trial_until = now + self._cooldown_s  # lapses if it never reports
            return True

    def end_trial(self) -> None:
        """The trial ended without a verdict: the next caller may try at once."""
        with self._lock:
            self._trial_until = 0.0

    def succeeded(self) -> None:
        if self._open_until is None and not self.consecutive:
            return  # the common case: nothing to change, no lock
        with self._lock:
            was_open = self._open_until is not None
            self._open_until, self._trial_until, self.consecutive = None, 0.0, 0
            self._cooldown_s = self._base_s
            if was_open:
                log.log(self._log_level, "%s is back up", self.name)
                self._notify(True)

    def failed(self, exc: BaseException | None = None) -> None:
        with self._lock:
            now = self._clock()
            self.failures += 1
            self.consecutive += 1
            state = self._state(now)
            if state == "open" or (state == "closed" and self.consecutive < self._threshold):
                return
            wait_s = self._cooldown_s
            self._open_until, self._trial_until = now + wait_s, 0.0
            self._cooldown_s = min(wait_s * 2, self._max_s)
            self.opened_total += 1
            if state == "closed":
                log.log(self._log_level, "%s is down after %d failure(s) (%r); next trial in "
                        "%.2fs", self.name, self.consecutive, exc, wait_s)
                self._notify(False)
            else:
                log.debug("%s trial failed (%r); next trial in %.2fs", self.name, exc, wait_s)

    def reset(self) -> None:
        """Forget the past (a new process behind a worker's URL): closed, cooldown at base."""
        self.succeeded()

    def _state(self, now: float) -> str:
        if self._open_until is None:
            return "closed"
        return "open" if now < self._open_until else "half_open"

    def _admits(self, now: float) -> bool:
        state = self._state(now)
        return state == "closed" or (state == "half_open" and now >= self._trial_until)

    def _notify(self, up: bool) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(up)
        except Exception:  # an observer bug must not turn into a caller's error
            log.exception("breaker %s: state listener failed", self.name)
