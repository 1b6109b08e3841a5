"""A worker's side of membership in Redis (wire/membership.py): it advertises itself under a
key with a TTL, refreshed every heartbeat; routers on any host list the keys to find workers.

    tandem:workers:<role>:<url>  ->  WorkerAd JSON      (SET ... PX ttl, every interval)

A worker that misses heartbeats for a TTL (3 beats by default) drops out of the listing by
itself; a draining worker says so in its ad, then deletes the key. Redis being down costs a
worker nothing but a log line: its ad comes back with the next beat after Redis does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from wire.membership import REDIS_ERRORS, WorkerAd, member_key, redis_client

log = logging.getLogger(__name__)


class Heartbeat:
    """Owns one worker's member key: refreshes it every `interval_s`, deletes it on stop()."""

    def __init__(self, redis_url: str, ad: Callable[[], WorkerAd], interval_s: float,
                 ttl_s: float, timeout_s: float = 0.5):
        self._client = redis_client(redis_url, timeout_s)
        self._ad = ad
        self._interval_s = interval_s
        self._ttl_ms = int(ttl_s * 1000)
        self._task: asyncio.Task | None = None
        self._failing = False
        self._stopped = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def beat(self) -> bool:
        ad = self._ad()
        try:
            await self._client.set(member_key(ad.role, ad.url), ad.model_dump_json(),
                                   px=self._ttl_ms)
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
        """Stop beating and remove the key, so routers stop sending at once (best effort)."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        ad = self._ad()
        with contextlib.suppress(*REDIS_ERRORS):
            await self._client.delete(member_key(ad.role, ad.url))
        with contextlib.suppress(*REDIS_ERRORS):
            await self._client.aclose()
