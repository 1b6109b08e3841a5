"""The router's side of Redis membership: list the workers that heartbeat (worker/heartbeat.py)
from the cluster's registry (wire/membership.py), never a SCAN of the keyspace.

    MULTI   ZREMRANGEBYSCORE  tandem:{<cluster>}:workers  -inf  (now - skew   prune the long gone
            ZRANGEBYSCORE     tandem:{<cluster>}:workers  now - skew  +inf    the members
    EXEC
    MGET    tandem:{<cluster>}:workers:ad:<url> ...                           their ads (None:
                                                                              the TTL lapsed)

All of these keys share the hash tag {<cluster>}, so on a Redis Cluster they live in one slot
and the MULTI and the MGET go to one node.

With TANDEM_INTERNAL_TOKEN set, an ad must carry a valid signature: a forged or altered one is
logged once and never reaches the pool, so the router never probes it with the token. A failed
listing is "unknown", never "empty": while Redis is down the pool keeps the workers it has and
its health probes stay in charge.
"""

from __future__ import annotations

import asyncio
import logging
import time

from wire.membership import (
    CLOCK_SKEW_S,
    REDIS_ERRORS,
    AdRejected,
    WorkerAd,
    ad_key,
    decode_ad,
    redis_client,
    registry_key,
    signing_key,
)

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
MAX_MEMBERS = 1024  # read at most this many per listing: a stuffed registry costs one bound
MAX_REJECTED_LOGGED = 1024  # rejected URLs remembered so each is logged once (then reset)


class Membership:
    def __init__(self, redis_url: str, timeout_s: float = 0.5, cluster_id: str = "default",
                 token: str | None = None):
        self._client = redis_client(redis_url, timeout_s)
        self._timeout_s = timeout_s
        self._cluster_id = cluster_id
        self._key = signing_key(token)
        self._failing = False
        self._rejected: set[str] = set()

    async def scan(self) -> list[WorkerAd] | None:
        """Every live worker's ad, or None if Redis could not be read (bounded)."""
        try:
            # Twice the socket timeout: the registry round trip plus the MGET.
            async with asyncio.timeout(self._timeout_s * 2):
                ads = await self._read()
        except REDIS_ERRORS as e:
            if not self._failing:
                log.warning("worker membership unreadable (%s); keeping the current pool", e)
            self._failing = True
            return None
        self._failing = False
        return ads

    async def _read(self) -> list[WorkerAd]:
        now = time.time()  # wall clock: the index is scored by workers' expiry times
        registry = registry_key(self._cluster_id)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(registry, "-inf", f"({now - CLOCK_SKEW_S}")
            pipe.zrangebyscore(registry, now - CLOCK_SKEW_S, "+inf", start=0, num=MAX_MEMBERS)
            _, members = await pipe.execute()
        urls = [m.decode(errors="replace") for m in members]
        keys = [ad_key(self._cluster_id, url) for url in urls]
        values = await self._client.mget(keys) if keys else []
        ads = []
        for url, value in zip(urls, values, strict=True):
            if value is None:
                continue  # its TTL lapsed: a dead worker's entry, pruned later
            ad = self._check(url, value, now)
            if ad is not None:
                ads.append(ad)
        return ads

    def _check(self, url: str, value: bytes, now: float) -> WorkerAd | None:
        try:
            ad = decode_ad(value, url, self._cluster_id, self._key, now)
        except AdRejected as e:
            self._log_rejected(url, str(e))
            return None
        if ad.role not in ROLES:
            self._log_rejected(url, f"unknown role {ad.role!r}")
            return None
        self._rejected.discard(url)  # a fixed worker that breaks again is logged again
        return ad

    def _log_rejected(self, url: str, why: str) -> None:
        if url in self._rejected:
            return
        if len(self._rejected) >= MAX_REJECTED_LOGGED:
            self._rejected.clear()
        self._rejected.add(url)
        log.warning("ignoring the worker ad for %r in cluster %r: %s", url, self._cluster_id,
                    why)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except REDIS_ERRORS:
            log.debug("closing the membership client failed", exc_info=True)
