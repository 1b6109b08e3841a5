"""The router's side of Redis membership: list the workers that heartbeat (worker/heartbeat.py).

A failed listing is "unknown", never "empty": while Redis is down the pool keeps the workers it
has and its health probes stay in charge.
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError

from wire.membership import MEMBERS_PREFIX, REDIS_ERRORS, WorkerAd, redis_client

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")


class Membership:
    def __init__(self, redis_url: str, timeout_s: float = 0.5):
        self._client = redis_client(redis_url, timeout_s)
        self._timeout_s = timeout_s
        self._failing = False

    async def scan(self) -> list[WorkerAd] | None:
        """Every live worker's ad, or None if Redis could not be read (bounded)."""
        try:
            # Twice the socket timeout: a SCAN round trip plus an MGET.
            ads = await asyncio.wait_for(self._read(), self._timeout_s * 2)
        except REDIS_ERRORS as e:
            if not self._failing:
                log.warning("worker membership unreadable (%s); keeping the current pool", e)
            self._failing = True
            return None
        self._failing = False
        return ads

    async def _read(self) -> list[WorkerAd]:
        keys = [k async for k in self._client.scan_iter(match=f"{MEMBERS_PREFIX}:*", count=200)]
        values = await self._client.mget(keys) if keys else []
        ads = []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue  # expired between SCAN and MGET
            try:
                ad = WorkerAd.model_validate_json(value)
            except ValidationError:
                log.warning("ignoring malformed worker ad under %r", key)
                continue
            if ad.role in ROLES:
                ads.append(ad)
        return ads

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except REDIS_ERRORS:
            log.debug("closing the membership client failed", exc_info=True)
