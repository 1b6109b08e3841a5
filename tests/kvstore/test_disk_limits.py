"""Disk tier bounds: private modes, a full disk that evicts instead of going down, and a byte
cap that holds across processes sharing the directory."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading

import pytest

from kvstore.codec import encode
from kvstore.disk import RESCAN_FRACTION, TMP_PREFIX
from kvstore.tiered import TieredStore
from tests.kvstore.helpers import all_bit_equal, disk_tier, make_block, make_blocks

SIZE = len(encode("k000", make_block()))  # every key below is 4 characters: one blob size


def _blobs(*keys: str) -> dict:
    return {k: encode(k, make_block(seed=i)) for i, k in enumerate(keys)}


def _keys(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def _disk_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.endswith(".kv"))


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_umask():
    """umask 0, so the modes seen are the ones the tier asked for, not the umask's."""
    old = os.umask(0)
    yield
    os.umask(old)


# --- permissions ---------------------------------------------------------------------------


def test_directory_0700_and_blocks_0600(disk_dir, no_umask):
    tier = disk_tier(disk_dir)
    tier.put_many(_blobs("k000", "k001"))
    assert _mode(disk_dir) == 0o700
    assert [_mode(p) for p in disk_dir.iterdir()] == [0o600, 0o600]


def test_temp_file_is_0600_before_the_first_byte(disk_dir, no_umask, monkeypatch):
    tier = disk_tier(disk_dir)
    seen = []
    real = tier._open_tmp

    def open_tmp(tmp):
        f = real(tmp)
        seen.append(_mode(tmp))
        return f
    monkeypatch.setattr(tier, "_open_tmp", open_tmp)
    tier.put_many(_blobs("k000"))
    assert seen == [0o600]


def test_open_directory_we_own_is_tightened(disk_dir, caplog):
    disk_dir.mkdir(mode=0o755)
    disk_dir.chmod(0o755)
    with caplog.at_level(logging.WARNING, "kvstore.disk"):
        disk_tier(disk_dir)
    assert _mode(disk_dir) == 0o700 and "tightened" in caplog.text


def test_open_directory_of_another_user_is_warned_about(disk_dir, caplog, monkeypatch):
    disk_dir.mkdir()
    disk_dir.chmod(0o777)
    monkeypatch.setattr(os, "getuid", lambda: disk_dir.stat().st_uid + 1)
    with caplog.at_level(logging.WARNING, "kvstore.disk"):
        tier = disk_tier(disk_dir)
    assert _mode(disk_dir) == 0o777 and "other users" in caplog.text
    assert tier.up  # a warning, not a fault


# --- disk full -----------------------------------------------------------------------------


class _FullFile:
    """A temp file whose write fails as on a full disk (the file itself exists: the tier must
    remove it)."""

    def __init__(self, f) -> None:
        self._f = f

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def _fill_disk(tier, monkeypatch, times: int) -> list:
    """The next `times` temp files fail with ENOSPC; returns the list of failures so far."""
    failed: list = []
    real = tier._open_tmp

    def open_tmp(tmp):
        f = real(tmp)
        if len(failed) < times:
            failed.append(tmp)
            return _FullFile(f)
        return f
    monkeypatch.setattr(tier, "_open_tmp", open_tmp)
    return failed


def _no_temp_files(path) -> bool:
    return not any(p.name.startswith(TMP_PREFIX) for p in path.iterdir())


def test_disk_full_evicts_the_oldest_and_retries(disk_dir, clock, monkeypatch):
    tier = disk_tier(disk_dir, clock=clock)  # a 1 GiB cap: the disk fills first
    tier.put_many(_blobs("k000", "k001", "k002"))
    tier.get_many(["k000"])
    failed = _fill_disk(tier, monkeypatch, times=1)
    assert tier.put_many(_blobs("k003")) == SIZE
    assert len(failed) == 1 and _no_temp_files(disk_dir)
    assert tier.up and tier.breaker.failures == 0
    assert tier.keys_lru() == ["k002", "k000", "k003"]  # k001 was least recently used
    stats = tier.stats()
    assert stats["disk_full"] == 1 and stats["evictions"] == 1 and stats["cap_bytes"] == 3 * SIZE
    tier.put_many(_blobs("k004"))  # the cap holds at what fitted: evict, do not fail
    assert tier.keys_lru() == ["k000", "k003", "k004"]
    clock.advance(31)  # past rescan_s: the next rescan lifts the cap again
    tier.put_many(_blobs("k005"))
    assert tier.keys_lru() == ["k000", "k003", "k004", "k005"]
    assert tier.stats()["cap_bytes"] == 1 << 30


def test_disk_full_through_the_store(disk_dir, clock, monkeypatch):
    tier = disk_tier(disk_dir, clock=clock)
    store = TieredStore([tier])
    old, new = make_blocks(2, seed=1), make_blocks(1, seed=2)
    store.put_many(old)
    _fill_disk(tier, monkeypatch, times=1)
    store.put_many(new)
    assert store.stats()["tiers"]["disk"]["up"] is True
    assert store.lookup_prefix(list(old)) == 0  # the oldest went
    assert all_bit_equal(store.get_many(list(new)), new)


def test_disk_still_full_after_eviction_marks_the_tier_down(disk_dir, clock, monkeypatch):
    tier = disk_tier(disk_dir, clock=clock)
    tier.put_many(_blobs("k000", "k001"))
    failed = _fill_disk(tier, monkeypatch, times=2)
    assert tier.put_many(_blobs("k002")) == 0
    assert len(failed) == 2 and _no_temp_files(disk_dir)  # one retry, no more
    assert not tier.up and tier.breaker.failures == 1


# --- one cap across processes --------------------------------------------------------------


def test_two_tiers_on_one_directory_stay_under_the_cap(disk_dir):
    """Interleaved puts from two processes' tiers, each started on the empty directory (so
    neither has seen the other's files): the directory never holds more than cap + a block."""
    cap = 4 * SIZE
    one, two = disk_tier(disk_dir, cap), disk_tier(disk_dir, cap)
    for a, b in zip(_keys("a", 12), _keys("b", 12), strict=True):
        one.put_many(_blobs(a))
        assert _disk_bytes(disk_dir) <= cap + SIZE
        two.put_many(_blobs(b))
        assert _disk_bytes(disk_dir) <= cap + SIZE
    assert _disk_bytes(disk_dir) == cap


def test_the_oldest_files_of_either_process_go_first(disk_dir):
    cap = 4 * SIZE
    one, two = disk_tier(disk_dir, cap), disk_tier(disk_dir, cap)
    for a, b in zip(_keys("a", 6), _keys("b", 6), strict=True):
        one.put_many(_blobs(a))
        two.put_many(_blobs(b))
    assert sorted(p.name for p in disk_dir.iterdir()) == ["a004.kv", "a005.kv", "b004.kv",
                                                          "b005.kv"]


def test_larger_cap_overshoots_by_at_most_a_rescan_interval(disk_dir):
    """With room for 64 blocks each process rescans every 64/RESCAN_FRACTION blocks it writes,
    so the other one can be that far over between rescans, and no further."""
    cap = 64 * SIZE
    one, two = disk_tier(disk_dir, cap), disk_tier(disk_dir, cap)
    bound = cap + cap // RESCAN_FRACTION + SIZE
    worst = 0
    for a, b in zip(_keys("a", 150), _keys("b", 150), strict=True):
        one.put_many(_blobs(a))
        two.put_many(_blobs(b))
        worst = max(worst, _disk_bytes(disk_dir))
    assert cap < worst <= bound


def test_concurrent_writers_stay_under_the_cap(disk_dir):
    cap = 4 * SIZE
    tiers = [disk_tier(disk_dir, cap) for _ in range(2)]
    errors: list = []

    def write(tier, prefix: str) -> None:
        try:
            for key in _keys(prefix, 40):
                tier.put_many(_blobs(key))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=write, args=(t, p)) for t, p in zip(tiers, "ab",
                                                                             strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(t.up for t in tiers)
    assert _disk_bytes(disk_dir) <= cap + SIZE
