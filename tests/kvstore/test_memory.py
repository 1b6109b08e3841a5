"""Memory tier: byte cap, exact LRU order, TTL."""

from __future__ import annotations

from kvstore.codec import encode
from kvstore.memory import MemoryTier
from tests.kvstore.helpers import make_block

BLOB = encode("x", make_block())  # every test blob has this size


def _blobs(*keys: str) -> dict:
    return {k: encode(k, make_block(seed=i)) for i, k in enumerate(keys)}


def test_cap_and_exact_lru_order():
    size = len(BLOB)
    tier = MemoryTier(capacity_bytes=3 * size)
    tier.put_many(_blobs("a", "b", "c"))
    assert tier.keys_lru() == ["a", "b", "c"]
    tier.get_many(["a"])  # a is now the most recent
    tier.put_many(_blobs("d"))  # evicts b, the least recent
    assert tier.keys_lru() == ["c", "a", "d"]
    tier.put_many(_blobs("e", "f"))
    assert tier.keys_lru() == ["d", "e", "f"]
    stats = tier.stats()
    assert stats["bytes_used"] == 3 * size <= stats["capacity_bytes"]
    assert stats["evictions"] == 3


def test_contains_does_not_touch_lru():
    tier = MemoryTier(capacity_bytes=2 * len(BLOB))
    tier.put_many(_blobs("a", "b"))
    assert tier.contains(["a", "zz", "b"]) == [True, False, True]
    tier.put_many(_blobs("c"))
    assert tier.keys_lru() == ["b", "c"]


def test_replacing_a_key_keeps_accounting_exact():
    tier = MemoryTier(capacity_bytes=10 * len(BLOB))
    for _ in range(3):
        tier.put_many(_blobs("a"))
    assert tier.stats()["bytes_used"] == len(BLOB)
    tier.delete(["a", "missing"])
    assert tier.stats()["bytes_used"] == 0


def test_blob_larger_than_cap_is_not_stored():
    tier = MemoryTier(capacity_bytes=len(BLOB) - 1)
    assert tier.put_many(_blobs("a")) == 0
    assert tier.get_many(["a"]) == [None]


def test_ttl(clock):
    tier = MemoryTier(capacity_bytes=1 << 20, clock=clock)
    tier.put_many(_blobs("short"), ttl_s=5)
    tier.put_many(_blobs("long"))
    clock.advance(4.9)
    assert tier.contains(["short", "long"]) == [True, True]
    clock.advance(0.2)
    assert tier.contains(["short", "long"]) == [False, True]
    assert tier.get_many(["short"]) == [None]
    assert tier.stats()["entries"] == 1
