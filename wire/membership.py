"""Worker membership in Redis, as both sides see it: the member key and the ad under it.

    tandem:workers:<role>:<url>  ->  WorkerAd JSON      (SET ... PX ttl, every interval)

Workers write their ad (worker/heartbeat.py); routers list them (router/dispatch/membership.py).
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

MEMBERS_PREFIX = "tandem:workers"


REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


def member_key(role: str, url: str) -> str:
    return f"{MEMBERS_PREFIX}:{role}:{url}"


class WorkerAd(BaseModel):
    """What a worker tells routers about itself (the JSON value of its member key)."""

    url: str
    role: str
    pid: int
    model: str
    draining: bool = False
    running: int = 0
    waiting: int = 0
    capacity: int = 0  # running + waiting at which it answers 429


def redis_client(url: str, timeout_s: float) -> aioredis.Redis:
    """Every call bounded by timeout_s, no hidden retries: a dead Redis costs one timeout."""
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0), health_check_interval=0,
    )
