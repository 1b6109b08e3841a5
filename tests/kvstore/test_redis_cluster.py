"""The Redis tier on a real 3-master Redis Cluster: batches split per master, a killed master
costs only its own keys (never a wrong value), and a moved slot is a miss, then followed."""

from __future__ import annotations

import time

from redis.crc import key_slot

from kvstore.breaker import Breaker
from kvstore.config import StoreConfig, build_store
from kvstore.redis_tier import RedisTier, kv_prefix
from kvstore.tiered import TieredStore
from tests.kvstore.churn import Churn
from tests.kvstore.helpers import all_bit_equal, bit_equal, make_blocks
from tests.redis_topology import poll

TIMEOUT_S = 0.3
SLACK_S = 1.5  # scheduling noise on a shared 2-vCPU box; still far below "hangs"


def rkey(key: str) -> str:
    return kv_prefix("default") + key


def live_store(url: str) -> tuple[TieredStore, RedisTier]:
    """A Redis-only store on the real clock, with short backoffs so a test sees recovery."""
    tier = RedisTier(url, Breaker("kvstore tier redis", 0.2, 1.0), timeout_s=TIMEOUT_S)
    return TieredStore([tier]), tier


def round_trips(store: TieredStore, blocks: dict) -> bool:
    store.put_many(blocks)
    return all_bit_equal(store.get_many(list(blocks)), blocks)


def test_a_batch_spreads_over_every_master(redis_cluster):
    redis_cluster.flushall()
    blocks = make_blocks(32)
    store, tier = live_store(redis_cluster.url)
    store.put_many(blocks)
    assert all_bit_equal(store.get_many(list(blocks)), blocks)
    assert store.lookup_prefix(list(blocks)) == 32
    per_node = [len(server.client().keys()) for server in redis_cluster.servers]
    assert sum(per_node) == 32 and all(n > 0 for n in per_node), per_node
    store.delete(list(blocks))  # per-key UNLINKs: never a cross-slot multi-key command
    assert redis_cluster.keys() == []
    assert tier.stats()["redirects"] == 0


def test_killed_master_costs_only_its_keys(own_cluster):
    blocks = make_blocks(48)
    keys = list(blocks)
    store, tier = live_store(own_cluster.url)
    store.put_many(blocks)
    victim = own_cluster.node_for(rkey(keys[0]))
    on_victim = {k for k in keys if own_cluster.node_for(rkey(k)) is victim}
    with Churn(store, blocks) as churn:
        churn.wait_rounds(5)
        victim.kill()
        churn.wait_rounds(40)
    assert churn.wrong == 0 and store.stats()["corrupt_blocks"] == 0
    assert churn.misses > 0  # the victim's keys did miss

    store.put_many(blocks)  # survivors take their keys back (the churn only wrote half)
    start = time.monotonic()
    out = store.get_many(keys)
    assert time.monotonic() - start < SLACK_S  # the dead master's breaker is open: no waiting
    for key, got in zip(keys, out, strict=True):
        assert (got is None) if key in on_victim else bit_equal(got, blocks[key])
    stats = tier.stats()
    assert stats["up"] and stats["nodes_down"] == [f"127.0.0.1:{victim.port}"]

    victim.restart()  # same port and nodes.conf: it owns its slots again, empty
    poll(lambda: round_trips(store, blocks), 30, "the restarted master to serve its keys")
    assert tier.stats()["nodes_down"] == []


def _node_id(server) -> str:
    with server.client() as client:
        return client.execute_command("CLUSTER", "MYID").decode()


def test_moved_slot_is_a_miss_then_followed(own_cluster):
    blocks = make_blocks(1)
    [key] = blocks
    store, tier = live_store(own_cluster.url)
    store.put_many(blocks)
    src = own_cluster.node_for(rkey(key))
    dst = next(s for s in own_cluster.servers if s is not src)
    slot, src_id, dst_id = key_slot(rkey(key).encode()), _node_id(src), _node_id(dst)
    dst.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000,
                                 "KEYS", rkey(key))
    assert store.get_many([key]) == [None]  # -ASK mid-migration: a miss
    for server in own_cluster.servers:
        server.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    poll(lambda: bit_equal(store.get_many([key])[0], blocks[key]), 10,
         "the tier to follow the slot to its new master")
    assert tier.stats()["redirects"] >= 1 and store.stats()["corrupt_blocks"] == 0


def test_cluster_unreachable_at_start_is_a_down_tier_not_an_error():
    store = build_store(StoreConfig(tiers="memory+redis", redis_timeout_s=TIMEOUT_S,
                                    redis_url="redis+cluster://127.0.0.1:1,127.0.0.1:2"))
    blocks = make_blocks(1)
    store.put_many(blocks)
    assert store.lookup_prefix(list(blocks)) == 1  # memory still serves
    assert store.stats()["tiers"]["redis"]["up"] is False
