"""Observability hook: kvstore reports, the services turn reports into Prometheus metrics.

kvstore never imports prometheus. A service passes an object with these four methods to
`build_store(config, observer=...)` and maps them in its metrics.py, e.g.:

    on_get(tier, s, nbytes, hits, misses) -> tandem:kvstore_get_seconds{tier}.observe(s)
                                             tandem:kvstore_bytes_total{tier,op="get"} += nbytes
                                             tandem:kvstore_hits_total{tier} += hits
                                             tandem:kvstore_misses_total{tier} += misses
    on_put(tier, s, nbytes)               -> tandem:kvstore_put_seconds{tier}.observe(s)
                                             tandem:kvstore_bytes_total{tier,op="put"} += nbytes
    on_corrupt(tier)                      -> tandem:kvstore_corrupt_blocks_total{tier} += 1
    on_tier_state(tier, up)               -> tandem:kvstore_tier_up{tier} = 1 if up else 0

Calls come from whichever thread used the store; an exception in the observer is logged and
swallowed, never passed to the caller of the store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol


class StoreObserver(Protocol):
    def on_get(self, tier: str, seconds: float, nbytes: int, hits: int, misses: int) -> None:
        """One batched read from `tier`: wall seconds, bytes returned, blocks found / not."""

    def on_put(self, tier: str, seconds: float, nbytes: int) -> None:
        """One batched write to `tier`: wall seconds and bytes stored."""

    def on_corrupt(self, tier: str) -> None:
        """A block from `tier` failed decoding (checksum, shape, key, version); it was a miss."""

    def on_tier_state(self, tier: str, up: bool) -> None:
        """`tier` went up or down (also called once per tier when the store is built)."""


class NullObserver:
    def on_get(self, tier: str, seconds: float, nbytes: int, hits: int, misses: int) -> None:
        pass

    def on_put(self, tier: str, seconds: float, nbytes: int) -> None:
        pass

    def on_corrupt(self, tier: str) -> None:
        pass

    def on_tier_state(self, tier: str, up: bool) -> None:
        pass


@dataclass(slots=True)
class TierCounters:
    """Per-tier totals that stats() returns, mirroring what the observer was told."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    expired: int = 0
    get_calls: int = 0
    put_calls: int = 0
    get_bytes: int = 0
    put_bytes: int = 0
    get_seconds: float = 0.0
    put_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)
