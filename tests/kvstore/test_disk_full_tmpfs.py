"""The disk tier on a real full filesystem: a 16 MiB tmpfs that a junk file fills to ENOSPC.

The faked ENOSPC in test_disk_limits.py fails one write only; a real full disk fails every
write that needs more space, so these tests check that the tier learns the disk is full once
and then evicts before it writes, instead of paying an ENOSPC (a thrown-away partial write and
a rescan) on every put.
"""

from __future__ import annotations

import errno

import pytest

from kvstore.codec import encode
from tests.kvstore.helpers import disk_tier, make_block
from tests.tmpfs import fill, free_bytes
from tests.tmpfs import tmpfs as mounted

TMPFS_SIZE = "16m"
SHAPE = (4, 2, 2, 64, 64)  # float32: 256 KiB of payload, 65 tmpfs pages with the header
OLD = 8  # blocks on the disk before it fills: what fits afterwards


def _blobs(prefix: str, n: int) -> dict[str, bytes]:
    return {f"{prefix}{i:03d}": encode(f"{prefix}{i:03d}", make_block(SHAPE, seed=i))
            for i in range(n)}


def _put_each(tier, blobs: dict[str, bytes]) -> list[int]:
    """One put_many per block, as a worker stores one block at a time; bytes stored each."""
    return [tier.put_many({k: v}) for k, v in blobs.items()]


def _count_enospc(tier, monkeypatch) -> list[str]:
    """Every write of `tier` that fails with ENOSPC, as it happens (the real filesystem's)."""
    seen: list[str] = []
    real = tier._write

    def write(path, blob) -> None:
        try:
            real(path, blob)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                seen.append(path.name)
            raise
    monkeypatch.setattr(tier, "_write", write)
    return seen


def _files(path) -> list[str]:
    return sorted(p.name.removesuffix(".kv") for p in path.iterdir() if p.name.endswith(".kv"))


@pytest.fixture
def tmpfs(tmp_path):
    """A real 16 MiB tmpfs: the only test that sees a real full disk."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    with mounted(mnt, TMPFS_SIZE):
        yield mnt


def test_full_tmpfs_costs_one_enospc_then_puts_evict(tmpfs, clock, monkeypatch):
    tier = disk_tier(tmpfs / "kv", clock=clock)  # a 1 GiB cap: the 16 MiB disk fills first
    old, new = _blobs("old", OLD), _blobs("new", 6)
    _put_each(tier, old)
    tier.get_many(["old000"])  # now the most recently used: it must outlive old001..old006
    junk = tmpfs / "junk"
    junk_size = fill(junk)
    assert free_bytes(tmpfs) < len(new["new000"])  # the next put cannot fit as things are
    enospc = _count_enospc(tier, monkeypatch)

    assert _put_each(tier, new) == [len(b) for b in new.values()]  # every put stored its block
    assert len(enospc) == 1 and tier.stats()["disk_full"] == 1  # the first put only
    assert tier.up and tier.breaker.failures == 0
    survivors = ["old007", "old000", *new]  # oldest first: old001..old006 went, in LRU order
    assert tier.keys_lru() == survivors and _files(tmpfs / "kv") == sorted(survivors)
    assert tier.stats()["evictions"] == 6
    assert tier.get_many(list(new)) == list(new.values())
    assert junk.stat().st_size == junk_size  # the tier evicts its own files only


def test_two_processes_on_a_full_tmpfs_each_hit_enospc_once(tmpfs, clock, monkeypatch):
    """Two tiers on one directory (two workers): each learns the disk is full from its own
    write, once; after that, evicting a file the other one already removed frees nothing,
    which must not cost an ENOSPC either."""
    one = disk_tier(tmpfs / "kv", clock=clock)
    _put_each(one, _blobs("old", OLD))
    two = disk_tier(tmpfs / "kv", clock=clock)  # starts on the filled directory
    junk = tmpfs / "junk"
    junk_size = fill(junk)
    seen = [_count_enospc(t, monkeypatch) for t in (one, two)]

    a, b = _blobs("a", 6), _blobs("b", 6)
    for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
        assert one.put_many({ka: va}) == len(va) and two.put_many({kb: vb}) == len(vb)
    assert [len(s) for s in seen] == [1, 1]
    assert one.up and two.up and one.breaker.failures == two.breaker.failures == 0
    on_disk = _files(tmpfs / "kv")
    assert not any(k.startswith("old") for k in on_disk)  # the oldest went first
    assert set(on_disk) >= {"a005", "b005"} and len(on_disk) == OLD
    assert junk.stat().st_size == junk_size
