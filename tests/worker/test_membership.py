"""Worker membership through a real Redis: heartbeats list a worker, stop() unlists it, a
lapsed heartbeat expires, and a Redis outage is "unknown" to the router, never "empty"."""

from __future__ import annotations

import asyncio
import time

from router.dispatch.membership import Membership
from tests.redis_server import RedisServer
from wire.membership import WorkerAd
from worker.heartbeat import Heartbeat


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
