"""In-process LRU tier, capped in bytes.

Holds encoded blobs that this process made or already verified, so reads skip the checksum.
Blobs are never mutated after insertion: a reader takes a reference under the lock and decodes
outside it, while a writer only swaps references, so a concurrent put can never tear a read.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.codec import Blob


@dataclass(slots=True)
class _Entry:
    blob: Blob
    nbytes: int
    deadline: float  # clock seconds after which the entry is gone; inf = no TTL


class MemoryTier:
    name = "memory"
    verify = False
    retains = True
    maps = False

    def __init__(self, capacity_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity_bytes = capacity_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU first, MRU last
        self._used = 0
        self._evictions = 0

    @property
    def up(self) -> bool:
        return True

    def keys_lru(self) -> list[str]:
        """Keys from least to most recently used (for tests and debugging)."""
        with self._lock:
            return list(self._entries)

    def contains(self, keys: list[str]) -> list[bool]:
        now = self._clock()
        with self._lock:
            return [(e := self._entries.get(k)) is not None and e.deadline > now for k in keys]

    def get_many(self, keys: list[str]) -> list[Blob | None]:
        now = self._clock()
        out: list[Blob | None] = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.deadline <= now:
                    self._drop(key)
                    entry = None
                if entry is not None:
                    self._entries.move_to_end(key)
                out.append(None if entry is None else entry.blob)
        return out

    def put_many(self, blobs: dict[str, Blob], ttl_s: float | None = None) -> int:
        deadline = math.inf if not ttl_s else self._clock() + ttl_s
        stored = 0
        with self._lock:
            for key, blob in blobs.items():
                nbytes = memoryview(blob).nbytes
                self._drop(key)
                if nbytes > self.capacity_bytes:
                    continue  # would evict everything and still not fit
                self._entries[key] = _Entry(blob, nbytes, deadline)
                self._used += nbytes
                stored += nbytes
                while self._used > self.capacity_bytes:
                    self._drop(next(iter(self._entries)))
                    self._evictions += 1
        return stored

    def delete(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._used -= entry.nbytes

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used = 0

    def stats(self) -> dict:
        with self._lock:
            return {"up": True, "bytes_used": self._used, "capacity_bytes": self.capacity_bytes,
                    "entries": len(self._entries), "evictions": self._evictions}
