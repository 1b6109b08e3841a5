"""The disk tier's byte accounting: which files to evict, and when. No I/O and no lock of its
own: DiskTier calls it under its lock and unlinks the keys it returns.

    index    key -> file bytes, least recently used first: this process's view of the directory
    used     bytes on disk as far as we know: the index, plus (while the disk is full) the
             bytes of files another process evicted under us, which its newer files, not seen
             yet, most likely fill (`unseen`)
    writing  bytes of this process's puts in flight (`begin` .. `end`): not in the index yet
    cap      capacity_bytes; while the disk is full, what fitted when it filled (`lower`)

At the full cap a put writes, then evicts down to the cap (`note`): the directory holds a block
over the cap for a moment, as the disk has room. While the disk is full there is none: a put
first evicts until every block in flight fits under the lowered cap (`reserve`), so it neither
fails nor pays for an ENOSPC (a thrown-away partial write and a rescan).
"""

from __future__ import annotations

from collections import OrderedDict


class DiskSpace:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.index: OrderedDict[str, int] = OrderedDict()  # key -> file bytes; LRU first
        self.used = 0
        self.writing = 0
        self.cap = capacity_bytes  # lowered while the disk is full (lower)
        self.full_until = 0.0  # clock seconds: the lowered cap holds until a rescan after it
        self.evictions = 0
        self.disk_full = 0  # ENOSPC / EDQUOT events (lower)

    def note(self, key: str, nbytes: int) -> list[str]:
        """Record a use of `key` (now nbytes on disk); returns the keys to evict."""
        self.used += nbytes - self.index.pop(key, 0)
        self.index[key] = nbytes
        return [k for k, _ in self._evict(self.cap, keep=1)]  # never the one just used

    def forget(self, key: str) -> None:
        self.used -= self.index.pop(key, 0)

    def reload(self, found: list[tuple[str, int]], now: float) -> list[str]:
        """A rescan's true view, (key, bytes) oldest first; returns the keys to evict. Past
        full_until the full cap comes back: the next ENOSPC, if the disk is still full,
        lowers it again."""
        self.index = OrderedDict(found)
        self.used = sum(self.index.values())
        if now >= self.full_until:
            self.cap = self.capacity_bytes
        return [k for k, _ in self._evict(self.cap, keep=1)]

    def begin(self, nbytes: int) -> None:
        """A put of nbytes starts: reserve and lower make room for it, and for the others in
        flight on other threads."""
        self.writing += nbytes

    def end(self, nbytes: int) -> None:
        """The put is over: noted in the index (or failed). Called after note, so that for a
        moment its bytes count twice, never not at all."""
        self.writing -= nbytes

    def reserve(self, now: float) -> list[tuple[str, int]]:
        """Before a write while the disk is full: the (key, bytes) to evict so that the blocks
        in flight fit under the cap. At the full cap, nothing (note evicts after the write);
        nor past full_until, so that a disk still full says so again (lower)."""
        if self.cap >= self.capacity_bytes or now >= self.full_until:
            return []
        return self._evict(self.cap - self.writing, keep=0)

    def unseen(self, nbytes: int) -> None:
        """Victims of reserve that were already gone freed nothing: another process evicted
        them, and its own newer files, not in our index, took the space. Count their bytes
        as used until the next rescan (reload) counts the real files."""
        self.used += nbytes

    def lower(self, until: float) -> list[str]:
        """The disk is full, and the index was just rescanned: hold the cap at what fitted
        until `until`, and return the keys to evict so the blocks in flight fit. [] and the
        cap left as it was when there is nothing to evict."""
        self.disk_full += 1
        cap = min(max(self.used, self.writing), self.cap)
        victims = [k for k, _ in self._evict(cap - self.writing, keep=0)]
        if victims:
            self.cap, self.full_until = cap, until
        return victims

    def stats(self) -> dict:
        return {"bytes_used": self.used, "capacity_bytes": self.capacity_bytes,
                "cap_bytes": self.cap, "entries": len(self.index),
                "evictions": self.evictions, "disk_full": self.disk_full}

    def _evict(self, limit: int, keep: int) -> list[tuple[str, int]]:
        """Pop least recently used entries until used <= limit or only `keep` are left."""
        victims = []
        while self.used > limit and len(self.index) > keep:
            victims.append(self.index.popitem(last=False))
            self.used -= victims[-1][1]
        self.evictions += len(victims)
        return victims
