"""The tiered store: prefix lookup, read-through with promotion, write-through, TTLs, stats."""

from __future__ import annotations

import mmap

import pytest
import torch

from kvstore import TIER_CHOICES, StoreConfig, build_store, tail_key
from kvstore.memory import MemoryTier
from kvstore.redis_tier import kv_prefix
from kvstore.tiered import TieredStore
from tests.kvstore.helpers import (
    RecordingObserver,
    all_bit_equal,
    bit_equal,
    disk_tier,
    make_block,
    make_blocks,
    make_ns,
    raw_client,
    redis_tier,
)

PREFIX = kv_prefix("default")  # where the Redis tier keeps values (cluster "default")


def _three_tier(disk_dir, redis_url, observer=None) -> TieredStore:
    config = StoreConfig(tiers="memory+disk+redis", disk_path=str(disk_dir),
                         redis_url=redis_url, tail_ttl_s=30)
    return build_store(config, observer)


def test_lookup_prefix_stops_at_first_miss():
    store = TieredStore([MemoryTier(1 << 30)])
    blocks = make_blocks(5)
    keys = list(blocks)
    store.put_many({k: blocks[k] for k in keys[:2] + keys[3:]})  # a hole at block 2
    assert store.lookup_prefix(keys) == 2
    assert store.lookup_prefix(keys[3:]) == 2
    assert store.lookup_prefix([]) == 0
    assert store.get_many([]) == []
    store.put_many({})


def test_prefix_may_span_tiers(disk_dir, redis_url):
    blocks = make_blocks(3)
    keys = list(blocks)
    memory, disk, red = MemoryTier(1 << 30), disk_tier(disk_dir), redis_tier(redis_url)
    TieredStore([memory]).put_many({keys[0]: blocks[keys[0]]})
    TieredStore([disk]).put_many({keys[1]: blocks[keys[1]]})
    TieredStore([red]).put_many({keys[2]: blocks[keys[2]]})
    store = TieredStore([memory, disk, red])
    assert store.lookup_prefix(keys) == 3
    assert all_bit_equal(store.get_many(keys), blocks)


def test_write_through_then_read_through_with_promotion(disk_dir, redis_url):
    blocks = make_blocks(3)
    keys = list(blocks)
    _three_tier(disk_dir, redis_url).put_many(blocks)
    assert len(list(disk_dir.iterdir())) == 3
    with raw_client(redis_url) as client:
        assert client.exists(*(PREFIX + k for k in keys)) == 3
        client.flushall()
    TieredStore([redis_tier(redis_url)]).put_many({keys[2]: blocks[keys[2]]})
    (disk_dir / f"{keys[2]}.kv").unlink()

    observer = RecordingObserver()
    store = _three_tier(disk_dir, redis_url, observer)  # a new process: empty memory
    assert all_bit_equal(store.get_many(keys), blocks)
    hits = {tier: (h, m) for tier, _, h, m in observer.gets}
    assert hits == {"memory": (0, 3), "disk": (2, 1), "redis": (1, 0)}
    assert (disk_dir / f"{keys[2]}.kv").exists()  # promoted from redis to disk
    assert store.tiers[0].keys_lru() == keys  # disk hits promoted first, then redis's
    observer.gets.clear()
    store.get_many(keys)
    assert [(t, h, m) for t, _, h, m in observer.gets] == [("memory", 3, 0)]


def test_returned_tensors_are_owned_by_the_caller(disk_dir):
    block = make_block(seed=9)
    store = build_store(StoreConfig(tiers="memory+disk", disk_path=str(disk_dir)))
    key = "k"
    store.put_many({key: block})
    block.zero_()  # the store took a copy
    first = store.get_many([key])[0]
    first.zero_()  # and hands out copies
    assert bit_equal(store.get_many([key])[0], make_block(seed=9))


def test_borrowed_memory_hits_view_the_tier_without_a_copy(disk_dir):
    store = build_store(StoreConfig(tiers="memory+disk", disk_path=str(disk_dir)))
    store.put_many({"k": make_block(seed=4)})
    a, b = store.get_many(["k"], borrow=True)[0], store.get_many(["k"], borrow=True)[0]
    assert bit_equal(a, make_block(seed=4))
    assert a.data_ptr() == b.data_ptr()  # both view the memory tier's one buffer
    owned = store.get_many(["k"])[0]
    assert owned.data_ptr() != a.data_ptr() and bit_equal(owned, a)


def test_a_load_the_caller_keeps_is_promoted_into_disk_but_not_into_memory(disk_dir, redis_url):
    blocks = make_blocks(3)
    keys = list(blocks)
    TieredStore([disk_tier(disk_dir)]).put_many({k: blocks[k] for k in keys[:2]})
    TieredStore([redis_tier(redis_url)]).put_many({keys[2]: blocks[keys[2]]})
    store = _three_tier(disk_dir, redis_url)  # a new process: empty memory
    assert all_bit_equal(store.get_many(keys, borrow=True, retain=False), blocks)
    assert store.tiers[0].keys_lru() == []  # the engine's pool keeps them, not the memory tier
    assert (disk_dir / f"{keys[2]}.kv").exists()  # a Redis hit still lands on the local disk


def test_disk_hits_map_their_file_and_memory_keeps_its_own_copy(disk_dir):
    key, other = "k", make_block(seed=8)
    memory, disk = MemoryTier(1 << 30), disk_tier(disk_dir)
    TieredStore([disk]).put_many({key: make_block(seed=7)})
    borrowed = TieredStore([memory, disk]).get_many([key], borrow=True)[0]
    kept = memory.get_many([key])[0]
    assert not isinstance(memoryview(kept).obj, mmap.mmap)  # promoted as a copy, not the map
    TieredStore([disk]).put_many({key: other})  # the file replaced under the mapping
    assert bit_equal(borrowed, make_block(seed=7))
    borrowed.zero_()  # a private mapping: the write stays in this process
    assert bit_equal(TieredStore([disk_tier(disk_dir)]).get_many([key])[0], other)
    assert bit_equal(TieredStore([memory]).get_many([key])[0], make_block(seed=7))


def test_tail_keys_get_the_tail_ttl(disk_dir, redis_url):
    ns = make_ns()
    tail, block_key = tail_key("req-7", ns), "block"
    store = _three_tier(disk_dir, redis_url)
    store.put_many({tail: make_block((2, 2, 1, 3, 8)), block_key: make_block()})
    store.put_many({"short": make_block()}, ttl_s=5)
    with raw_client(redis_url) as client:
        assert 25_000 < client.pttl(PREFIX + tail) <= 30_000
        assert 3_500_000 < client.pttl(PREFIX + block_key) <= 3_600_000  # redis_ttl_s default
        assert 0 < client.pttl(PREFIX + "short") <= 5_000


def test_unsupported_dtype_raises_at_the_boundary():
    store = TieredStore([MemoryTier(1 << 20)])
    with pytest.raises(ValueError):
        store.put_many({"k": torch.zeros(2, dtype=torch.float64)})


def test_stats_and_observer(disk_dir):
    observer = RecordingObserver()
    store = build_store(StoreConfig(tiers="memory+disk", disk_path=str(disk_dir)), observer)
    assert observer.states == [("memory", True), ("disk", True)]
    blocks = make_blocks(2)
    store.put_many(blocks)
    store.get_many(list(blocks) + ["missing"])
    stats = store.stats()
    assert stats["hits"] == 2 and stats["misses"] == 1 and stats["corrupt_blocks"] == 0
    memory = stats["tiers"]["memory"]
    assert memory["hits"] == 2 and memory["misses"] == 1 and memory["entries"] == 2
    assert memory["put_bytes"] == memory["bytes_used"] == memory["get_bytes"]
    assert stats["tiers"]["disk"]["misses"] == 1 and stats["tiers"]["disk"]["up"] is True
    assert [p[0] for p in observer.puts] == ["memory", "disk"]


def test_a_failing_observer_never_reaches_the_caller(disk_dir):
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("observer bug")

    store = build_store(StoreConfig(tiers="memory+disk", disk_path=str(disk_dir)), Broken())
    blocks = make_blocks(1)
    store.put_many(blocks)
    assert store.get_many(list(blocks))[0] is not None


def test_a_raising_tier_is_a_miss():
    class Exploding(MemoryTier):
        def get_many(self, keys):
            raise RuntimeError("tier bug")

    store = TieredStore([Exploding(1 << 20)])
    store.put_many(make_blocks(1))
    assert store.get_many(list(make_blocks(1))) == [None]


def test_corrupt_disk_copy_falls_through_to_redis(disk_dir, redis_url):
    blocks = make_blocks(1)
    key = next(iter(blocks))
    _three_tier(disk_dir, redis_url).put_many(blocks)
    path = disk_dir / f"{key}.kv"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(raw)
    store = _three_tier(disk_dir, redis_url)
    assert bit_equal(store.get_many([key])[0], blocks[key])
    tiers = store.stats()["tiers"]
    assert tiers["disk"]["corrupt"] == 1 and tiers["redis"]["hits"] == 1
    assert path.read_bytes() != bytes(raw)  # rewritten by the promotion


def test_delete_removes_from_every_tier(disk_dir, redis_url):
    blocks = make_blocks(2)
    store = _three_tier(disk_dir, redis_url)
    store.put_many(blocks)
    store.delete(list(blocks))
    assert store.lookup_prefix(list(blocks)) == 0
    assert not list(disk_dir.iterdir())


@pytest.mark.parametrize("tiers", TIER_CHOICES)
def test_build_store_tiers(tiers, disk_dir, redis_url):
    store = build_store(StoreConfig(tiers=tiers, disk_path=str(disk_dir), redis_url=redis_url))
    assert [t.name for t in store.tiers] == tiers.split("+")
    store.close()


@pytest.mark.parametrize("bad", [dict(tiers="redis+memory"), dict(memory_bytes=0),
                                 dict(redis_timeout_s=0), dict(tail_ttl_s=-1)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        StoreConfig(**bad)
