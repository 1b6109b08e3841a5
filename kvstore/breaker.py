"""Up/down state of a fallible tier (disk, Redis), with exponential backoff between probes.

    up --failure--> down --(backoff elapsed: next call probes)--> up   (probe succeeded)
                      ^                                        \\-> down (backoff doubled)

While a tier is down its calls answer "miss" at once, so a dead Redis costs a request nothing
after the first bounded timeout. Only one caller per backoff window gets to probe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Breaker:
    def __init__(self, name: str, base_s: float = 0.5, max_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.name = name
        self._base_s = base_s
        self._max_s = max_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._up = True
        self._backoff_s = base_s
        self._retry_at = 0.0  # clock seconds; a down tier is probed once this has passed
        self.failures = 0

    @property
    def up(self) -> bool:
        return self._up

    def set_listener(self, on_change: Callable[[bool], None] | None) -> None:
        self._on_change = on_change

    def allow(self) -> bool:
        """True if a call may go to the tier now (it is up, or this call is the probe)."""
        with self._lock:
            if self._up:
                return True
            now = self._clock()
            if now < self._retry_at:
                return False
            self._retry_at = now + self._backoff_s  # other callers wait for this probe
            return True

    def succeeded(self) -> None:
        if self._up:
            return  # the common case: no lock, nothing to change
        with self._lock:
            changed = not self._up
            self._up = True
            self._backoff_s = self._base_s
        if changed:
            log.warning("kvstore tier %s is back up", self.name)
            self._notify(True)

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            changed = self._up
            self._up = False
            self.failures += 1
            self._retry_at = self._clock() + self._backoff_s
            wait_s = self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self._max_s)
        if changed:
            log.warning("kvstore tier %s is down (%s: %s); retrying in %.2fs",
                        self.name, type(exc).__name__, exc, wait_s)
            self._notify(False)
        else:
            log.debug("kvstore tier %s probe failed: %s", self.name, exc)

    def _notify(self, up: bool) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(up)
        except Exception:  # an observer bug must not turn into a store error
            log.exception("kvstore tier-state listener failed")
