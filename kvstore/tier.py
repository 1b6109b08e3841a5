"""The one small interface every storage tier implements (memory.py, disk.py, redis_tier.py).

Tiers move encoded blobs (codec.py), never tensors, so a block read from Redis can be promoted
into memory and disk without being re-encoded or re-checksummed. A tier never raises for a
storage fault: it answers "miss" (None / False), marks itself down (breaker.py) and recovers.
"""

from __future__ import annotations

from typing import Protocol

from kvstore.codec import Blob


class Tier(Protocol):
    name: str      # "memory" | "disk" | "redis": the label in stats and metrics
    verify: bool   # blobs read back must have their checksum verified (they left the process)
    retains: bool  # get_many returns the stored buffer itself: decode must copy
    maps: bool     # get_many's blobs map files (disk.map_file): never retained as they are

    @property
    def up(self) -> bool: ...

    def contains(self, keys: list[str]) -> list[bool]:
        """Presence per key; does not count as a use for LRU."""
        ...

    def get_many(self, keys: list[str]) -> list[Blob | None]:
        """Blob per key, None on a miss; a hit counts as a use for LRU."""
        ...

    def put_many(self, blobs: dict[str, Blob], ttl_s: float | None = None) -> int:
        """Store blobs (replacing any old value); returns the bytes actually stored."""
        ...

    def delete(self, keys: list[str]) -> None: ...

    def close(self) -> None: ...

    def stats(self) -> dict:
        """Tier-owned state: bytes_used, entries, evictions, errors and the like."""
        ...
