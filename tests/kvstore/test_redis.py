"""Redis tier against a real redis-server: auth, eviction, corruption, death and return."""

from __future__ import annotations

import time

import pytest

from kvstore.config import StoreConfig, build_store
from kvstore.redis_tier import kv_prefix
from kvstore.tiered import TieredStore
from tests.kvstore.helpers import (
    SMOL_SHAPE,
    RecordingObserver,
    all_bit_equal,
    bit_equal,
    make_blocks,
    one_tier_store,
    raw_client,
    redis_tier,
)
from tests.redis_server import RedisServer

TIMEOUT_S = 0.3
SLACK_S = 1.5  # scheduling noise on a shared 2-vCPU box; still far below "hangs"


def rkey(key: str, cluster_id: str = "default") -> str:
    """Where the tier keeps a store key in Redis."""
    return kv_prefix(cluster_id) + key


def _store(url: str, clock=None, observer=None) -> TieredStore:
    return TieredStore([redis_tier(url, clock, timeout_s=TIMEOUT_S)], observer)


def test_round_trip_and_ttl(redis_url):
    blocks = make_blocks(3)
    keys = list(blocks)
    _store(redis_url).put_many(blocks, ttl_s=120)
    reader = _store(redis_url)
    assert reader.lookup_prefix(keys) == 3
    assert all_bit_equal(reader.get_many(keys), blocks)
    with raw_client(redis_url) as client:
        assert 110_000 < client.pttl(rkey(keys[0])) <= 120_000


def test_password_url():
    with RedisServer(password="s3cret pw") as server:
        blocks = make_blocks(2)
        assert "s3cret%20pw@" in server.url
        store = _store(server.url)
        store.put_many(blocks)
        assert store.lookup_prefix(list(blocks)) == 2
        wrong = _store(server.url.replace("s3cret%20pw", "nope"))
        assert wrong.get_many(list(blocks)) == [None, None]  # auth failure: down, no raise
        assert wrong.stats()["tiers"]["redis"]["up"] is False
        anonymous = _store(f"redis://127.0.0.1:{server.port}/0")
        assert anonymous.lookup_prefix(list(blocks)) == 0


def test_tls_url_is_accepted():
    store = build_store(StoreConfig(tiers="memory+redis", redis_timeout_s=TIMEOUT_S,
                                    redis_url="rediss://:pw@127.0.0.1:1/0"))
    store.put_many(make_blocks(1))
    assert store.lookup_prefix(list(make_blocks(1))) == 1  # memory still serves
    assert store.stats()["tiers"]["redis"]["up"] is False


def test_maxmemory_eviction_is_a_miss_not_an_error():
    with RedisServer(maxmemory="12mb", maxmemory_policy="allkeys-lru") as server:
        blocks = make_blocks(16, SMOL_SHAPE, seed=1)  # 16 x 2.9 MB fp32 into 12 MB
        keys = list(blocks)
        store = _store(server.url)
        for key in keys:
            store.put_many({key: blocks[key]})
        out = store.get_many(keys)
        assert out[0] is None and bit_equal(out[-1], blocks[keys[-1]])
        assert all(o is None or bit_equal(o, blocks[k]) for o, k in zip(out, keys, strict=True))
        assert store.lookup_prefix(keys) == 0
        assert store.stats()["tiers"]["redis"]["up"] is True


def test_noeviction_oom_is_counted():
    with RedisServer(maxmemory="4mb", maxmemory_policy="noeviction") as server:
        blocks = make_blocks(4, SMOL_SHAPE)
        store = _store(server.url)
        store.put_many(blocks)
        tier = store.stats()["tiers"]["redis"]
        assert tier["up"] is True and tier["put_errors"] >= 3


@pytest.mark.parametrize("where", ["payload", "header"])
def test_corrupt_value_is_a_counted_miss_and_removed(redis_url, where):
    blocks = make_blocks(2)
    keys = list(blocks)
    observer = RecordingObserver()
    store = _store(redis_url, observer=observer)
    store.put_many(blocks)
    with raw_client(redis_url) as client:
        value = client.get(rkey(keys[1]))
        at = len(value) - 3 if where == "payload" else 33
        client.setrange(rkey(keys[1]), at, bytes([value[at] ^ 0x40]))
        out = store.get_many(keys)
        assert bit_equal(out[0], blocks[keys[0]]) and out[1] is None
        assert observer.corrupt == ["redis"] and store.stats()["corrupt_blocks"] == 1
        assert client.exists(rkey(keys[1])) == 0


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def test_killed_server_falls_back_then_comes_back(own_redis, clock, tmp_path):
    observer = RecordingObserver()
    config = StoreConfig(tiers="memory+disk+redis", redis_url=own_redis.url,
                         disk_path=str(tmp_path), redis_timeout_s=TIMEOUT_S, backoff_s=0.5)
    store = build_store(config, observer, clock)
    blocks, only_in_redis = make_blocks(2, seed=1), make_blocks(2, seed=2)
    store.put_many(blocks)
    _store(own_redis.url).put_many(only_in_redis)
    assert store.lookup_prefix(list(only_in_redis)) == 2

    own_redis.kill()
    out, took = _timed(lambda: store.get_many(list(blocks) + list(only_in_redis)))
    assert took < TIMEOUT_S + SLACK_S
    assert [o is not None for o in out] == [True, True, False, False]  # memory still serves
    assert ("redis", False) in observer.states
    _, took = _timed(lambda: store.put_many(make_blocks(1, seed=3)))  # skipped: tier is down
    assert took < SLACK_S and store.lookup_prefix(list(only_in_redis)) == 0

    own_redis.restart()  # same port, empty (no persistence)
    store.put_many(only_in_redis)
    assert store.stats()["tiers"]["redis"]["up"] is False  # still inside the backoff window
    clock.advance(0.6)
    store.put_many(only_in_redis)  # this call probes, and succeeds
    assert observer.states[-1] == ("redis", True)
    assert _store(own_redis.url).lookup_prefix(list(only_in_redis)) == 2


def test_hung_server_costs_one_timeout(own_redis, clock):
    store = _store(own_redis.url, clock)
    blocks = make_blocks(1)
    store.put_many(blocks)
    own_redis.pause()  # accepts connections, answers nothing
    try:
        out, took = _timed(lambda: store.get_many(list(blocks)))
        assert out == [None] and TIMEOUT_S * 0.9 < took < TIMEOUT_S + SLACK_S
        out, took = _timed(lambda: store.get_many(list(blocks)))
        assert out == [None] and took < 0.1  # down: no wait at all
    finally:
        own_redis.resume()
    clock.advance(0.6)
    assert bit_equal(store.get_many(list(blocks))[0], next(iter(blocks.values())))


def test_server_down_at_start(clock):
    server = RedisServer()
    server.start()
    server.kill()
    store = build_store(StoreConfig(tiers="memory+redis", redis_url=server.url,
                                    redis_timeout_s=TIMEOUT_S), clock=clock)
    try:
        store.put_many(make_blocks(1))
        assert store.lookup_prefix(list(make_blocks(1))) == 1
        server.restart()
        clock.advance(0.6)
        store.put_many(make_blocks(1))
        assert store.stats()["tiers"]["redis"]["up"] is True
    finally:
        server.close()


def test_one_tier_store_reads_from_redis(redis_url):
    blocks = make_blocks(2)
    one_tier_store("redis", url=redis_url).put_many(blocks)
    out = one_tier_store("redis", url=redis_url).get_many(list(blocks))
    assert all_bit_equal(out, blocks)


def _cluster_store(url: str, cluster_id: str) -> TieredStore:
    return build_store(StoreConfig(tiers="redis", redis_url=url, redis_timeout_s=TIMEOUT_S,
                                   cluster_id=cluster_id))


def test_clusters_sharing_a_redis_never_see_each_others_blocks(redis_url):
    blocks = make_blocks(2)
    keys = list(blocks)
    _cluster_store(redis_url, "stack-a").put_many(blocks)
    assert _cluster_store(redis_url, "stack-b").lookup_prefix(keys) == 0
    assert _cluster_store(redis_url, "stack-b").get_many(keys) == [None, None]
    _cluster_store(redis_url, "stack-b").delete(keys)  # b's delete cannot reach a's blocks
    assert all_bit_equal(_cluster_store(redis_url, "stack-a").get_many(keys), blocks)
    with raw_client(redis_url) as client:
        assert sorted(client.scan_iter()) == sorted(rkey(k, "stack-a").encode() for k in keys)


def test_bad_cluster_id_is_refused(redis_url):
    for bad in ("", "a:b", "a*", "x" * 33, "a b"):
        with pytest.raises(ValueError, match="cluster id"):
            _cluster_store(redis_url, bad)
