"""A worker's side of membership in Redis (wire/membership.py): every heartbeat it rewrites its
ad under a key with a TTL and its entry in the cluster's index; routers on any host read the
index to find workers.

    MULTI
      SET   tandem:{<cluster>}:workers:ad:<url>  <ad JSON, signed with a token>  PX ttl
      ZADD  tandem:{<cluster>}:workers           <expires_at>  <url>
    EXEC

A worker that misses heartbeats for a TTL (3 beats by default) drops out of the listing by
itself; a draining worker says so in its ad, then deletes both. Redis being down costs a worker
nothing but a log line: its ad comes back with the next beat after Redis does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from wire.membership import (
    REDIS_ERRORS,
    WorkerAd,
    ad_key,
    encode_ad,
    redis_client,
    registry_key,
    signing_key,
)

log = logging.getLogger(__name__)


class Heartbeat:
    """Owns one worker's ad and index entry: refreshes them every `interval_s`, deletes them on
    stop(). With `token` (TANDEM_INTERNAL_TOKEN) every ad is signed."""

    def __init__(self, redis_url: str, ad: Callable[[], WorkerAd], interval_s: float,
                 ttl_s: float, timeout_s: float = 0.5, cluster_id: str = "default",
                 token: str | None = None):
        self._client = redis_client(redis_url, timeout_s)
        self._ad = ad
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._cluster_id = cluster_id
        self._key = signing_key(token)
        self._task: asyncio.Task | None = None
        self._failing = False
        self._stopped = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def beat(self) -> bool:
        ad = self._ad()
        expires_at = time.time() + self._ttl_s  # wall clock: routers on other hosts compare it
        value = encode_ad(ad, self._cluster_id, expires_at, self._key)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(ad_key(self._cluster_id, ad.url), value, px=self._ttl_ms)
                pipe.zadd(registry_key(self._cluster_id), {ad.url: expires_at})
                await pipe.execute()
        except REDIS_ERRORS as e:
            if not self._failing:
                log.warning("heartbeat to Redis failed (%s); retrying every %.1fs",
                            e, self._interval_s)
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeat to Redis restored")
        self._failing = False
        return True

    async def _run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self._interval_s)

    async def stop(self) -> None:
        """Stop beating and unlist, so routers stop sending at once (best effort)."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        url = self._ad().url
        with contextlib.suppress(*REDIS_ERRORS):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(ad_key(self._cluster_id, url))
                pipe.zrem(registry_key(self._cluster_id), url)
                await pipe.execute()
        with contextlib.suppress(*REDIS_ERRORS):
            await self._client.aclose()
