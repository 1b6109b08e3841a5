"""Which page digests a worker holds on its device, as a counting Bloom filter: the summary it
publishes for KV-aware routing (router/dispatch/kv_route.py).

A page digest (engine/page_hash.py) is 16 uniformly random bytes, so its K positions are its
first K little-endian 32-bit words mod M: no further hashing, and the router computes the same
positions from the same digests.

    counts: uint8 [M]     one counter per position; a digest is "in" when all K are > 0
    packed: uint8 [M / 8] counts > 0, bit-packed (numpy.packbits order): what /kv_summary sends

Sizing: M = 16 bits per pool page (a power of two, at most 2^20 bits = 128 KiB packed), K = 4.
At a full pool the false-positive rate per page is (1 - e^(-K/16))^K ~= 0.24% (1.1% at the cap
with a 100k-page GPU pool). A false positive costs one misrouted request, never a wrong answer:
the worker looks its pages up again itself.

Counting, so an evicted page can be taken out. A counter that reaches 255 stays there (saturated
counters are never decremented): the filter may keep saying yes to a digest it lost, never no to
one it holds.

Cost: `add` and `remove` touch K counters, on the engine thread, once per page registered or
evicted. `packed` reads M counters; another thread may call it while the engine writes, and get
a mix of two steps' states: a hint, like the pool's own lock-free lookup.
"""

from __future__ import annotations

import numpy as np

HASHES = 4  # K: 4 x 32-bit words of a 16-byte digest
BITS_PER_PAGE = 16  # M / pages: ~0.24% false positives per page at a full pool (see above)
MIN_BITS = 1 << 10
MAX_BITS = 1 << 20  # 128 KiB packed: what a router fetches when the summary changed
_SATURATED = 255


def filter_bits(num_pages: int) -> int:
    """M for a pool of `num_pages`: a power of two in [MIN_BITS, MAX_BITS]."""
    want = max(MIN_BITS, num_pages * BITS_PER_PAGE)
    return min(MAX_BITS, 1 << (want - 1).bit_length())


def positions(digest: bytes, bits: int) -> np.ndarray:
    """The K positions of `digest` in a filter of `bits` positions (a power of two)."""
    words = np.frombuffer(digest[: 4 * HASHES], dtype="<u4")
    return (words & np.uint32(bits - 1)).astype(np.int64)


def contains(packed: np.ndarray, bits: int, digest: bytes) -> bool:
    """Whether a packed filter (np.packbits of the counts > 0) may hold `digest`."""
    pos = positions(digest, bits)
    return bool(np.all((packed[pos >> 3] >> (7 - (pos & 7))) & 1))


class ResidentFilter:
    """Owned by the PagePool: it adds a digest when a page is registered and removes it when
    the page is evicted. `version` changes with every add or remove, so a reader can tell
    whether to fetch the summary again."""

    def __init__(self, num_pages: int) -> None:
        self.bits = filter_bits(num_pages)
        self.counts = np.zeros(self.bits, dtype=np.uint8)
        self.version = 0

    def add(self, digest: bytes) -> None:
        pos = positions(digest, self.bits)
        c = self.counts[pos]
        self.counts[pos] = np.where(c < _SATURATED, c + 1, c)
        self.version += 1

    def remove(self, digest: bytes) -> None:
        pos = positions(digest, self.bits)
        c = self.counts[pos]
        self.counts[pos] = np.where((c > 0) & (c < _SATURATED), c - 1, c)
        self.version += 1

    def packed(self) -> bytes:
        return np.packbits(self.counts > 0).tobytes()
