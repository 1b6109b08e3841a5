"""The Redis tier behind a real Sentinel (master + replica + one sentinel): a failover under load
never yields a wrong value, the tier goes down, then comes back on the promoted replica, and no
connection to the old master outlives the switch."""

from __future__ import annotations

from kvstore.breaker import Breaker
from kvstore.redis_tier import RedisTier, kv_prefix
from kvstore.tiered import TieredStore
from tests.kvstore.churn import Churn
from tests.kvstore.helpers import RecordingObserver, all_bit_equal, make_blocks
from tests.redis_topology import RedisSentinelGroup, poll

TIMEOUT_S = 0.3


def live_store(url: str) -> tuple[TieredStore, RecordingObserver]:
    """A Redis-only store on the real clock, with short backoffs so a test sees recovery."""
    observer = RecordingObserver()
    tier = RedisTier(url, Breaker("kvstore tier redis", 0.2, 1.0), timeout_s=TIMEOUT_S)
    return TieredStore([tier], observer), observer


def round_trips(store: TieredStore, blocks: dict) -> bool:
    store.put_many(blocks)
    return all_bit_equal(store.get_many(list(blocks)), blocks)


def holds(server, blocks: dict) -> bool:
    with server.client() as client:
        return client.exists(*(kv_prefix("default") + k for k in blocks)) == len(blocks)


def test_failover_under_load(tmp_path):
    with RedisSentinelGroup(tmp_path) as group:
        blocks = make_blocks(24)
        store, observer = live_store(group.url)
        assert round_trips(store, blocks)
        old = group.master
        with Churn(store, blocks) as churn:
            churn.wait_rounds(5)
            old.kill()
            new = group.wait_failover(old.port)
            churn.wait_rounds(20)
        assert churn.wrong == 0 and store.stats()["corrupt_blocks"] == 0
        assert ("redis", False) in observer.states  # the breaker opened on the dead master
        fresh = make_blocks(4, seed=7)
        poll(lambda: round_trips(store, fresh), 20, "the tier to write to the new master")
        assert observer.states[-1] == ("redis", True) and holds(new, fresh)


def _clients_of(server) -> list[dict]:
    """Plain client connections on `server`: not the sentinel's (named), not a replica's
    (flag S), not the one asking."""
    with server.client() as client:
        return [c for c in client.client_list()
                if c["flags"] == "N" and not c["name"].startswith("sentinel")
                and c["cmd"] != "client|list"]


def test_coordinated_failover_leaves_no_connection_on_the_old_master(tmp_path):
    """SENTINEL FAILOVER keeps the old master alive, as a replica: pooled connections to it
    would still read, so the tier must drop them and reconnect through the sentinel."""
    with RedisSentinelGroup(tmp_path) as group:
        blocks = make_blocks(8)
        store, observer = live_store(group.url)
        assert round_trips(store, blocks)
        assert _clients_of(group.master)  # the tier's pooled connection sits on the master
        new = group.failover()
        fresh = make_blocks(4, seed=9)
        # Until the sentinel turns the old master into a replica, a pooled connection may still
        # write there (lost later, so a miss, never a wrong value); its first READONLY reply
        # drops the connections and the next call asks the sentinel.
        poll(lambda: round_trips(store, fresh) and holds(new, fresh), 30,
             "the tier to write to the new master")
        assert store.stats()["corrupt_blocks"] == 0
        assert _clients_of(group.master) == []
