"""Worker membership through a real Redis: heartbeats list a worker, stop() unlists it, a
lapsed heartbeat expires, and a Redis outage is "unknown" to the router, never "empty". Stacks
with different cluster ids never see each other; with a token, forged ads never reach the pool."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from router.dispatch.membership import Membership
from router.dispatch.pool import WorkerPool
from tests.redis_server import RedisServer
from tests.redis_topology import RedisClusterServers, RedisSentinelGroup
from wire.membership import (
    CLOCK_SKEW_S,
    WorkerAd,
    ad_key,
    encode_ad,
    registry_key,
    signing_key,
)
from worker.heartbeat import Heartbeat
from worker.settings import WorkerSettings


def ad(url: str = "http://w:1") -> WorkerAd:
    return WorkerAd(url=url, role="decode", pid=1, model="m", capacity=4)


def test_heartbeat_lists_and_unlists_a_worker(tmp_path):
    async def main(url: str) -> None:
        beat = Heartbeat(url, ad, interval_s=0.05, ttl_s=0.5)
        members = Membership(url)
        beat.start()
        try:
            deadline = time.monotonic() + 5
            while not await members.scan():
                assert time.monotonic() < deadline, "the ad never appeared"
                await asyncio.sleep(0.02)
            assert await members.scan() == [ad()]
        finally:
            await beat.stop()
        assert await members.scan() == []  # deleted at once, not left to expire
        await members.close()

    with RedisServer(tmp_path) as redis:
        asyncio.run(main(redis.url))


def test_lapsed_heartbeat_expires(tmp_path):
    async def main(url: str) -> None:
        beat = Heartbeat(url, lambda: ad("http://dead:1"), interval_s=10, ttl_s=0.3)
        members = Membership(url)
        assert await beat.beat()  # one beat, then the "worker" dies without unlisting
        assert [a.url for a in await members.scan()] == ["http://dead:1"]
        deadline = time.monotonic() + 5
        while await members.scan():
            assert time.monotonic() < deadline, "the ad never expired"
            await asyncio.sleep(0.05)
        await members.close()

    with RedisServer(tmp_path) as redis:
        asyncio.run(main(redis.url))


def test_redis_down_is_unknown_not_empty(tmp_path):
    async def main(url: str) -> None:
        beat = Heartbeat(url, ad, interval_s=1, ttl_s=3, timeout_s=0.2)
        members = Membership(url, timeout_s=0.2)
        start = time.monotonic()
        assert await beat.beat() is False
        assert await members.scan() is None
        assert time.monotonic() - start < 2  # bounded by the timeouts
        await members.close()
        await beat.stop()

    with RedisServer(tmp_path) as redis:
        url = redis.url
        redis.kill()
        asyncio.run(main(url))


# --- clusters and signed ads ------------------------------------------------------------------

TOKEN = "s3cret-token"


def signed_beat(url: str, worker: str, cluster_id: str = "default", token: str | None = TOKEN):
    return Heartbeat(url, lambda: ad(worker), interval_s=10, ttl_s=5, cluster_id=cluster_id,
                     token=token)


def test_clusters_sharing_a_redis_never_see_each_others_workers(tmp_path):
    async def main(url: str) -> None:
        a, b = signed_beat(url, "http://a:1", "a"), signed_beat(url, "http://b:1", "b")
        assert await a.beat() and await b.beat()
        for cluster_id, want in (("a", "http://a:1"), ("b", "http://b:1"), ("c", None)):
            members = Membership(url, cluster_id=cluster_id, token=TOKEN)
            assert [x.url for x in await members.scan()] == ([want] if want else [])
            await members.close()
        await a.stop()
        await b.stop()

    with RedisServer(tmp_path) as redis:
        asyncio.run(main(redis.url))


async def forge(url: str) -> None:
    """One good worker and four ads that must never reach a router holding TOKEN."""
    assert await signed_beat(url, "http://good:1").beat()
    assert await signed_beat(url, "http://unsigned:1", token=None).beat()
    assert await signed_beat(url, "http://wrongkey:1", token="another-token").beat()
    assert await signed_beat(url, "http://elsewhere:1", cluster_id="other").beat()
    client = aioredis.Redis.from_url(url)
    good = json.loads(await client.get(ad_key("default", "http://good:1")))
    good["ad"]["url"] = "http://tampered:1"  # the signature no longer covers the body
    await client.set(ad_key("default", "http://tampered:1"), json.dumps(good))
    await client.zadd(registry_key("default"), {"http://tampered:1": time.time() + 5})
    moved = await client.get(ad_key("other", "http://elsewhere:1"))  # signed, wrong cluster
    await client.set(ad_key("default", "http://elsewhere:1"), moved)
    await client.zadd(registry_key("default"), {"http://elsewhere:1": time.time() + 5})
    await client.aclose()


def test_forged_ads_are_never_added_nor_probed(tmp_path, caplog):
    probed: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        probed.append(request.url.host)
        return httpx.Response(200, json={
            "role": "decode", "model": "m", "pid": 1, "fingerprint": "fp", "dtype": "float32",
            "block_size": 4, "max_model_len": 512, "running": 0, "waiting": 0, "counters": {}})

    async def main(url: str) -> list[str]:
        await forge(url)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            pool = WorkerPool(client, [], [], membership=Membership(url, token=TOKEN))
            await pool.refresh()
            await pool.refresh()
            await pool.close()
            return [w.url for w in pool.workers()]

    with RedisServer(tmp_path) as redis:
        assert asyncio.run(main(redis.url)) == ["http://good:1"]
    assert set(probed) == {"good"}
    rejected = [r.getMessage() for r in caplog.records if "ignoring the worker ad" in r.message]
    assert len(rejected) == 4  # once each, not once per listing
    assert all(TOKEN not in line for line in rejected)


def test_without_a_token_unsigned_ads_are_trusted(tmp_path):
    async def main(url: str) -> list[str]:
        assert await signed_beat(url, "http://plain:1", token=None).beat()
        assert await signed_beat(url, "http://signed:1").beat()
        members = Membership(url)
        try:
            return sorted(a.url for a in await members.scan())
        finally:
            await members.close()

    with RedisServer(tmp_path) as redis:
        assert asyncio.run(main(redis.url)) == ["http://plain:1", "http://signed:1"]


def test_replayed_ad_is_refused_and_dead_entries_are_pruned(tmp_path):
    async def main(url: str, client) -> None:
        old = time.time() - CLOCK_SKEW_S - 1
        value = encode_ad(ad("http://old:1"), "default", old, signing_key(TOKEN))
        client.set(ad_key("default", "http://old:1"), value)  # a captured ad, re-SET by hand
        client.zadd(registry_key("default"), {"http://old:1": time.time() + 5,
                                              "http://gone:1": old})
        members = Membership(url, token=TOKEN)
        assert await members.scan() == []
        assert client.zrange(registry_key("default"), 0, -1) == [b"http://old:1"]
        await members.close()

    with RedisServer(tmp_path) as redis, redis.client() as client:
        asyncio.run(main(redis.url, client))


def test_cluster_id_is_validated():
    assert WorkerSettings(_env_file=None, cluster_id="stack_2-b").cluster_id == "stack_2-b"
    for bad in ("", "a:b", "tandem*", "x" * 33):
        with pytest.raises(ValidationError):
            WorkerSettings(_env_file=None, cluster_id=bad)


# --- Redis Cluster and Sentinel -------------------------------------------------------------


@pytest.fixture(scope="module", params=["cluster", "sentinel"])
def topology(request, tmp_path_factory):
    """A 3-master cluster (redis+cluster://) or a sentinel-watched master (redis+sentinel://)."""
    kind = RedisClusterServers if request.param == "cluster" else RedisSentinelGroup
    with kind(tmp_path_factory.mktemp(request.param)) as group:
        yield group


async def wait_listed(members: Membership, want: list[str], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while sorted(a.url for a in await members.scan() or []) != want:
        assert time.monotonic() < deadline, f"the listing never became {want}"
        await asyncio.sleep(0.05)


def test_membership_on_a_cluster_and_behind_sentinel(topology):
    async def main(url: str) -> None:
        a, b = signed_beat(url, "http://a:1"), signed_beat(url, "http://b:1")
        members = Membership(url, token=TOKEN)
        assert await a.beat() and await b.beat()  # MULTI: SET ad + ZADD, one slot
        await wait_listed(members, ["http://a:1", "http://b:1"])  # MULTI, then one MGET
        await a.stop()
        assert [x.url for x in await members.scan()] == ["http://b:1"]
        await b.stop()
        assert await members.scan() == []
        await members.close()

    asyncio.run(main(topology.url))


def test_membership_follows_a_sentinel_failover(tmp_path):
    async def main(group: RedisSentinelGroup) -> None:
        beat = signed_beat(group.url, "http://w:1")
        members = Membership(group.url, token=TOKEN)
        assert await beat.beat()
        await wait_listed(members, ["http://w:1"])
        old = group.master.port
        group.master.kill()
        group.wait_failover(old)
        deadline = time.monotonic() + 20
        while not await beat.beat():  # the next beat after the promotion lands on the replica
            assert time.monotonic() < deadline, "the heartbeat never reached the new master"
            await asyncio.sleep(0.1)
        await wait_listed(members, ["http://w:1"])
        await beat.stop()
        await members.close()

    with RedisSentinelGroup(tmp_path) as group:
        asyncio.run(main(group))
