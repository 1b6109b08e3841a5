"""Disk tier: byte cap, exact LRU order, restarts, shared directories, faults."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from kvstore.codec import encode
from kvstore.disk import TMP_PREFIX
from kvstore.tiered import TieredStore
from tests.kvstore.helpers import (
    SMALL_SHAPE,
    all_bit_equal,
    bit_equal,
    disk_tier,
    make_block,
    make_blocks,
    one_tier_store,
)

SIZE = len(encode("a", make_block()))  # one-letter keys: all blobs below have this size


def _blobs(*keys: str) -> dict:
    return {k: encode(k, make_block(seed=i)) for i, k in enumerate(keys)}


def _disk_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.endswith(".kv"))


def test_cap_and_exact_lru_order(disk_dir):
    tier = disk_tier(disk_dir, capacity=3 * SIZE)
    tier.put_many(_blobs("a", "b", "c"))
    tier.get_many(["a"])
    tier.put_many(_blobs("d"))  # evicts b
    assert tier.keys_lru() == ["c", "a", "d"]
    assert sorted(p.name for p in disk_dir.iterdir()) == ["a.kv", "c.kv", "d.kv"]
    tier.put_many(_blobs("e", "f"))
    assert tier.keys_lru() == ["d", "e", "f"]
    assert _disk_bytes(disk_dir) == tier.stats()["bytes_used"] == 3 * SIZE


def test_lru_order_survives_restart(disk_dir):
    tier = disk_tier(disk_dir, capacity=4 * SIZE)
    tier.put_many(_blobs("a", "b", "c", "d"))
    tier.get_many(["b"])
    tier.get_many(["a"])
    assert tier.keys_lru() == ["c", "d", "b", "a"]
    again = disk_tier(disk_dir, capacity=4 * SIZE)  # a new process on the same directory
    assert again.keys_lru() == ["c", "d", "b", "a"]
    again.put_many(_blobs("e"))
    assert again.keys_lru() == ["d", "b", "a", "e"]
    smaller = disk_tier(disk_dir, capacity=2 * SIZE)  # restart with a smaller cap: evict LRU
    assert smaller.keys_lru() == ["a", "e"]
    assert _disk_bytes(disk_dir) == 2 * SIZE


def test_blocks_survive_restart(disk_dir):
    blocks = make_blocks(3)
    one_tier_store("disk", path=disk_dir).put_many(blocks)
    fresh = one_tier_store("disk", path=disk_dir)
    assert fresh.lookup_prefix(list(blocks)) == 3
    assert all_bit_equal(fresh.get_many(list(blocks)), blocks)


def test_two_processes_share_a_directory(disk_dir):
    one, two = disk_tier(disk_dir), disk_tier(disk_dir)
    one.put_many(_blobs("a"))
    assert two.contains(["a"]) == [True]  # other process's file appears
    assert two.get_many(["a"])[0] is not None
    one.delete(["a"])
    assert two.contains(["a"]) == [False]  # and vanishes under it
    assert two.get_many(["a"]) == [None]
    assert two.stats()["entries"] == 0


def test_shared_directory_stays_under_cap(disk_dir):
    one, two = disk_tier(disk_dir, 3 * SIZE), disk_tier(disk_dir, 3 * SIZE)
    one.put_many(_blobs("a", "b"))
    two.rescan()
    two.put_many(_blobs("c", "d"))
    assert _disk_bytes(disk_dir) <= 3 * SIZE
    assert two.keys_lru() == ["b", "c", "d"]


def test_stale_temp_files_are_reaped(disk_dir):
    disk_dir.mkdir()
    stale, fresh = disk_dir / f"{TMP_PREFIX}1-dead", disk_dir / f"{TMP_PREFIX}2-busy"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (1, 1))
    disk_tier(disk_dir)
    assert not stale.exists() and fresh.exists()


def test_disk_full_marks_tier_down_then_recovers(disk_dir, clock, monkeypatch):
    tier = disk_tier(disk_dir, clock=clock)
    store = TieredStore([tier])
    blocks = make_blocks(2)
    keys = list(blocks)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    store.put_many(blocks)  # no exception
    assert not tier.up and store.stats()["tiers"]["disk"]["up"] is False
    assert not any(p.name.startswith(TMP_PREFIX) for p in disk_dir.iterdir())
    assert store.get_many(keys) == [None, None]  # down: misses at once
    monkeypatch.undo()
    store.put_many(blocks)  # still inside the backoff window: skipped
    assert store.lookup_prefix(keys) == 0
    clock.advance(0.6)
    store.put_many(blocks)  # the probe succeeds
    assert tier.up and store.lookup_prefix(keys) == 2


def test_unusable_directory_is_a_down_tier_until_fixed(tmp_path, clock):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    store = TieredStore([disk_tier(blocker / "kv", clock=clock)])  # mkdir: NotADirectoryError
    blocks = make_blocks(1)
    store.put_many(blocks)
    assert store.get_many(list(blocks)) == [None]
    assert store.stats()["tiers"]["disk"]["up"] is False
    blocker.unlink()
    clock.advance(0.6)
    store.put_many(blocks)  # the probe makes the directory
    assert store.stats()["tiers"]["disk"]["up"] is True and store.lookup_prefix(list(blocks)) == 1


def test_directory_removed_under_us(disk_dir):
    store = one_tier_store("disk", path=disk_dir)
    blocks = make_blocks(2)
    store.put_many(blocks)
    shutil.rmtree(disk_dir)
    assert store.get_many(list(blocks)) == [None, None]
    store.put_many(blocks)
    assert store.lookup_prefix(list(blocks)) == 2


@pytest.mark.parametrize("where", ["payload", "header"])
def test_corrupt_file_is_a_counted_miss(disk_dir, where):
    blocks = make_blocks(2, SMALL_SHAPE)
    keys = list(blocks)
    one_tier_store("disk", path=disk_dir).put_many(blocks)
    path = disk_dir / f"{keys[0]}.kv"
    raw = bytearray(path.read_bytes())
    raw[-5 if where == "payload" else 40] ^= 0xFF
    path.write_bytes(raw)
    store = one_tier_store("disk", path=disk_dir)
    out = store.get_many(keys)
    assert out[0] is None and bit_equal(out[1], blocks[keys[1]])
    stats = store.stats()
    assert stats["corrupt_blocks"] == 1 and stats["tiers"]["disk"]["misses"] == 1
    assert not path.exists()  # cleaned up for the next reader
