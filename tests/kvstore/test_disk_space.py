"""The disk tier's byte accounting on its own (kvstore/disk_space.py): no files, sizes in
blocks of 100 bytes, clock seconds passed in."""

from __future__ import annotations

from kvstore.disk_space import DiskSpace

B = 100  # one block's bytes


def _space(n: int, capacity: int = 1000 * B) -> DiskSpace:
    """n blocks k0 (least recently used) .. k<n-1> on disk."""
    space = DiskSpace(capacity)
    space.reload([(f"k{i}", B) for i in range(n)], now=0.0)
    return space


def _full(n: int) -> DiskSpace:
    """n blocks, and a put of one more that just hit ENOSPC, now in force until t=30."""
    space = _space(n)
    space.begin(B)
    assert space.lower(until=30.0) == ["k0"]  # room for the block in flight
    space.note("new", B)
    space.end(B)
    return space


def test_at_the_full_cap_nothing_is_evicted_before_a_write():
    space = _space(3, capacity=3 * B)
    space.begin(B)
    assert space.reserve(now=1.0) == []
    assert space.note("k3", B) == ["k0"]  # after it, as before


def test_while_full_each_put_evicts_before_it_writes():
    space = _full(4)
    assert space.cap == 4 * B and space.used == 4 * B and space.disk_full == 1
    space.begin(B)
    assert space.reserve(now=1.0) == [("k1", B)]
    assert space.note("k4", B) == []  # it fits: nothing more to evict after the write


def test_puts_in_flight_on_two_threads_each_get_room():
    space = _full(4)
    space.begin(B)
    assert space.reserve(now=1.0) == [("k1", B)]
    space.begin(B)  # a second writer thread, before the first one's note
    assert space.reserve(now=1.0) == [("k2", B)]


def test_files_another_process_evicted_free_nothing():
    space = _full(4)
    space.begin(B)
    assert space.reserve(now=1.0) == [("k1", B)]
    space.unseen(B)  # k1 was already gone: the other process's new file took its place
    assert space.reserve(now=1.0) == [("k2", B)]


def test_the_lowered_cap_lapses_after_full_until():
    space = _full(4)
    space.begin(B)
    assert space.reserve(now=30.0) == []  # write, and let a still-full disk say so again
    space.reload(list(space.index.items()), now=30.0)
    assert space.cap == 1000 * B


def test_nothing_to_evict_leaves_the_cap_alone():
    space = _space(0)
    space.begin(B)
    assert space.lower(until=30.0) == [] and space.cap == 1000 * B and space.disk_full == 1
