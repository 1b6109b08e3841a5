"""Keyed MACs: with a mac_key, only blocks written under that key and that block key load.
Whoever can write the disk folder or Redis can still make valid xxh3 checksums; here that
is not enough."""

from __future__ import annotations

import struct

import pytest
import torch

from kvstore import derive_mac_key
from kvstore.codec import MAC_BYTES, CorruptBlock, decode, encode
from kvstore.config import StoreConfig, build_store
from kvstore.memory import MemoryTier
from kvstore.tiered import TieredStore
from tests.kvstore.helpers import (
    SMALL_SHAPE,
    SMOL_SHAPE,
    RecordingObserver,
    all_bit_equal,
    bit_equal,
    disk_tier,
    make_block,
    make_blocks,
    raw_client,
    redis_tier,
)

KEY_A = derive_mac_key("token-a")
KEY_B = derive_mac_key("token-b")


def _reason(blob, key: str, mac_key: bytes | None) -> str:
    with pytest.raises(CorruptBlock) as err:
        decode(blob, key, mac_key=mac_key)
    return err.value.args[0]


def _flip(blob, offset: int) -> bytearray:
    out = bytearray(blob)
    out[offset] ^= 0x01
    return out


def test_derive_mac_key():
    assert len(KEY_A) == 32 and derive_mac_key("token-a") == KEY_A and KEY_A != KEY_B
    assert b"token-a" not in KEY_A
    with pytest.raises(ValueError):
        derive_mac_key("")


@pytest.mark.parametrize("shape,dtype", [(SMALL_SHAPE, torch.float32),
                                         (SMOL_SHAPE, torch.bfloat16)])
def test_keyed_round_trip_is_bit_exact(shape, dtype):
    block = make_block(shape, dtype, seed=7)
    blob = encode("k", block, mac_key=KEY_A)
    assert memoryview(blob).nbytes == memoryview(encode("k", block)).nbytes + MAC_BYTES
    for copy in (True, False):
        assert bit_equal(decode(blob, "k", copy=copy, mac_key=KEY_A), block)
    assert bit_equal(decode(bytes(blob), "k", mac_key=KEY_A), block)


def test_forged_block_with_a_valid_checksum_is_refused():
    forged = encode("k", make_block(seed=1))  # what anyone can write: xxh3 only
    assert bit_equal(decode(forged, "k"), make_block(seed=1))  # a keyless store takes it
    assert _reason(forged, "k", KEY_A) == "no MAC"


def test_bad_mac_is_refused():
    blob = bytearray(encode("k", make_block(), mac_key=KEY_A))
    blob[-1] ^= 0x01
    assert _reason(blob, "k", KEY_A) == "MAC mismatch"
    fake_tag = bytearray(encode("k", make_block(), mac_key=KEY_A))
    fake_tag[-MAC_BYTES:] = bytes(MAC_BYTES)
    assert _reason(fake_tag, "k", KEY_A) == "MAC mismatch"


def test_other_key_is_refused():
    blob = encode("k", make_block(), mac_key=KEY_A)
    assert _reason(blob, "k", KEY_B) == "MAC mismatch"
    assert _reason(blob, "k", None) == "MAC-protected block, but this store has no key"


def test_every_bit_flip_is_detected():
    blob = encode("k", make_block(), mac_key=KEY_A)
    for offset in range(len(blob)):
        _reason(_flip(blob, offset), "k", KEY_A)


def test_stripping_the_mac_is_refused():
    """A downgrade: drop the tag, clear the MAC length, leave a valid checksum."""
    blob = encode("k", make_block(), mac_key=KEY_A)
    stripped = bytearray(blob[:-MAC_BYTES])
    stripped[28] = 0
    assert _reason(stripped, "k", KEY_A) == "no MAC"


def test_replay_under_another_key_is_refused():
    """The MAC covers the header, which holds the block key: renaming the block in the header
    breaks the MAC, and not renaming it is a key mismatch."""
    k1, k2 = "key-one", "key-two"  # the same length, as block keys are
    blob = encode(k1, make_block(), mac_key=KEY_A)
    assert _reason(blob, k2, KEY_A) == "key mismatch"
    renamed = bytes(blob).replace(k1.encode(), k2.encode())
    assert _reason(renamed, k2, KEY_A) == "MAC mismatch"
    unkeyed = bytes(encode(k1, make_block())).replace(k1.encode(), k2.encode())
    assert _reason(unkeyed, k2, None) == "checksum mismatch"


def test_unchecked_blob_carries_no_mac():
    """checksum=False (a memory-only store) writes no tag; only verify=False reads it."""
    blob = encode("k", make_block(), checksum=False, mac_key=KEY_A)
    assert struct.unpack_from("<B", blob, 28)[0] == 0
    assert bit_equal(decode(blob, "k", verify=False, mac_key=KEY_A), make_block())
    assert _reason(blob, "k", KEY_A) == "no MAC"


def test_config_checks_and_hides_the_key():
    config = StoreConfig(mac_key=KEY_A)
    assert "mac_key" not in repr(config) and KEY_A.hex() not in repr(config)
    for bad in (b"", b"short", bytes(65)):
        with pytest.raises(ValueError, match="mac_key"):
            StoreConfig(mac_key=bad)


# --- through the store, per shared tier ---------------------------------------------------


def _store(kind: str, disk_dir, redis_url: str, mac_key: bytes | None,
           observer=None) -> TieredStore:
    tier = disk_tier(disk_dir) if kind == "disk" else redis_tier(redis_url)
    return TieredStore([tier], observer, mac_key=mac_key)


def _raw(kind: str, disk_dir, redis_url: str):
    """get(key) / set(key, bytes) on the tier's storage, under the tier's own naming."""
    if kind == "disk":
        return (lambda k: (disk_dir / f"{k}.kv").read_bytes(),
                lambda k, v: (disk_dir / f"{k}.kv").write_bytes(v))
    return (lambda k: _redis(redis_url, k, lambda c, n: c.get(n)),
            lambda k, v: _redis(redis_url, k, lambda c, n: c.set(n, v)))


def _redis(url: str, key: str, op):
    """op(client, name) on the Redis name that holds store key `key`, whatever prefix the tier
    puts in front of it."""
    with raw_client(url) as client:
        name = next(n for n in client.scan_iter() if n.endswith(key.encode()))
        return op(client, name)


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_forged_block_in_a_shared_tier_is_a_counted_miss(kind, disk_dir, redis_url):
    blocks = make_blocks(2)
    keys = list(blocks)
    _store(kind, disk_dir, redis_url, KEY_A).put_many(blocks)
    get, put = _raw(kind, disk_dir, redis_url)
    put(keys[1], bytes(encode(keys[1], make_block(seed=99))))  # xxh3-valid, no MAC
    observer = RecordingObserver()
    reader = _store(kind, disk_dir, redis_url, KEY_A, observer)
    out = reader.get_many(keys)
    assert bit_equal(out[0], blocks[keys[0]]) and out[1] is None
    assert observer.corrupt == [kind] and reader.stats()["corrupt_blocks"] == 1
    assert reader.lookup_prefix(keys) == 1  # deleted, for every reader


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_block_written_under_key_a_is_a_miss_under_key_b(kind, disk_dir, redis_url):
    blocks = make_blocks(2)
    keys = list(blocks)
    _store(kind, disk_dir, redis_url, KEY_A).put_many(blocks)
    assert all_bit_equal(_store(kind, disk_dir, redis_url, KEY_A).get_many(keys), blocks)
    reader = _store(kind, disk_dir, redis_url, KEY_B)
    assert reader.get_many(keys) == [None, None]
    assert reader.stats()["corrupt_blocks"] == 2


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_block_copied_to_another_key_is_a_miss(kind, disk_dir, redis_url):
    blocks = make_blocks(2)
    keys = list(blocks)
    _store(kind, disk_dir, redis_url, KEY_A).put_many(blocks)
    get, put = _raw(kind, disk_dir, redis_url)
    put(keys[1], get(keys[0]))  # as is: the header names keys[0]
    reader = _store(kind, disk_dir, redis_url, KEY_A)
    assert reader.get_many(keys)[1] is None
    _store(kind, disk_dir, redis_url, KEY_A).put_many(blocks)
    put(keys[1], get(keys[0]).replace(keys[0].encode(), keys[1].encode()))  # header renamed
    assert reader.get_many(keys)[1] is None
    assert reader.stats()["corrupt_blocks"] == 2


@pytest.mark.parametrize("mac_key", [None, KEY_A], ids=["keyless", "keyed"])
def test_a_config_reads_its_own_blocks(mac_key, tmp_path, redis_url):
    """Through build_store, every tier; the reader is a fresh store, as another process."""
    config = StoreConfig(tiers="memory+disk+redis", disk_path=str(tmp_path), mac_key=mac_key,
                         redis_url=redis_url)
    blocks = make_blocks(3, SMOL_SHAPE, torch.bfloat16)
    keys = list(blocks)
    build_store(config).put_many(blocks)
    for tiers in ("disk", "redis"):
        reader = build_store(StoreConfig(tiers=tiers, disk_path=str(tmp_path), mac_key=mac_key,
                                         redis_url=redis_url))
        assert all_bit_equal(reader.get_many(keys), blocks)
        assert reader.stats()["corrupt_blocks"] == 0
    reader = build_store(config)  # disk hit promoted into memory, then read from memory
    assert all_bit_equal(reader.get_many(keys), blocks)
    assert all_bit_equal(reader.get_many(keys), blocks)
    assert reader.stats()["tiers"]["memory"]["hits"] == 3


def test_keyed_memory_only_store():
    store = TieredStore([MemoryTier(1 << 30)], mac_key=KEY_A)  # nothing leaves: no MAC made
    blocks = make_blocks(2)
    store.put_many(blocks)
    assert all_bit_equal(store.get_many(list(blocks)), blocks)
