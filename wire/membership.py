"""Worker membership in Redis, as both sides see it: the registry, the ad, and its signature.

    tandem:{<cluster>}:workers           ZSET  url -> the ad's expiry (unix s)   the index
    tandem:{<cluster>}:workers:ad:<url>  ad JSON, SET ... PX ttl                 one per worker

The braces are a Redis Cluster hash tag: every membership key of a cluster id lands in one slot,
so the MULTI and MGET that span them work on a cluster too. (Before it, the keys were
tandem:<cluster>:workers...; a worker and a router on either side of that change do not see each
other, so upgrade them together.)

Workers write their ad and index entry together, every beat (worker/heartbeat.py); routers
read the index, then the ads (router/dispatch/membership.py). Liveness is the ad key's Redis
TTL, so clocks never decide whether a worker is up; the index score only lets routers prune
members that are long gone, and list the registry without a SCAN of the keyspace.

An ad is JSON: the WorkerAd, the cluster id, an expiry (unix seconds), and with
TANDEM_INTERNAL_TOKEN set an HMAC-SHA256 over the canonical JSON of the rest, keyed by a key
derived from the token. A router with the token drops an ad whose signature is missing or wrong
(anyone who can write Redis could otherwise send it traffic and the token), whose cluster is
another's, or whose expiry is past (a replayed old ad):

    {"ad": {...WorkerAd...}, "cluster": "default", "expires_at": 1767225600.5, "sig": "9f0c..."}
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math

from pydantic import BaseModel
from redis.exceptions import RedisClusterException, RedisError

from kvstore.redis_url import async_client

# RedisClusterException (no node answers, an uncovered slot) is not a RedisError.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

# How far a worker's clock may run behind a router's before its ads read as expired (and its
# index entry is pruned). Liveness is the ad key's TTL; this only bounds replay of an old ad.
CLOCK_SKEW_S = 60.0
AD_KEY_CONTEXT = b"tandem-ad-v1"  # the signing key is derived from the token, never the token


def registry_key(cluster_id: str) -> str:
    return f"tandem:{{{cluster_id}}}:workers"  # {...}: the hash tag


def ad_key(cluster_id: str, url: str) -> str:
    return f"{registry_key(cluster_id)}:ad:{url}"


class WorkerAd(BaseModel):
    """What a worker tells routers about itself."""

    url: str
    role: str
    pid: int
    model: str
    draining: bool = False
    running: int = 0
    waiting: int = 0
    capacity: int = 0  # running + waiting at which it answers 429
    instance_id: str = ""  # one per process: the worker's identity, whatever URL reaches it


class AdRejected(ValueError):
    """An ad the router must not act on; the message says why (for one log line)."""


def signing_key(token: str | None) -> bytes | None:
    """The ad-signing key for an internal token (None: ads go unsigned and unchecked)."""
    if not token:
        return None
    return hmac.new(token.encode(), AD_KEY_CONTEXT, hashlib.sha256).digest()


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sign(key: bytes, body: dict) -> str:
    return hmac.new(key, AD_KEY_CONTEXT + _canonical(body), hashlib.sha256).hexdigest()


def encode_ad(ad: WorkerAd, cluster_id: str, expires_at: float, key: bytes | None) -> str:
    """The value a worker stores: the ad, its cluster and expiry, signed when key is set."""
    body = {"ad": ad.model_dump(mode="json"), "cluster": cluster_id, "expires_at": expires_at}
    if key is not None:
        body["sig"] = _sign(key, body)
    return json.dumps(body)


def decode_ad(value: bytes | str, url: str, cluster_id: str, key: bytes | None,
              now: float) -> WorkerAd:
    """The ad stored for `url`, checked; raises AdRejected. With key=None the signature is not
    checked: Redis is then trusted."""
    body = _parse(value)
    sig = body.pop("sig", None)
    if key is not None:
        if not isinstance(sig, str):
            raise AdRejected("unsigned (this router has TANDEM_INTERNAL_TOKEN set)")
        if not (sig.isascii() and hmac.compare_digest(sig, _sign(key, body))):
            raise AdRejected("bad signature (another token, or altered)")
    try:
        ad = WorkerAd.model_validate(body.get("ad"))
        expires_at = float(body["expires_at"])
    except (KeyError, TypeError, ValueError):  # ValueError covers pydantic's ValidationError
        raise AdRejected("malformed ad") from None
    if body.get("cluster") != cluster_id:
        raise AdRejected(f"for cluster {body.get('cluster')!r}, not {cluster_id!r}")
    if ad.url != url:
        raise AdRejected(f"listed under {url!r} but names {ad.url!r}")
    if not math.isfinite(expires_at) or expires_at + CLOCK_SKEW_S < now:
        raise AdRejected("expired (a replayed ad, or a worker clock far behind)")
    return ad


def _parse(value: bytes | str) -> dict:
    try:
        body = json.loads(value)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        raise AdRejected("not JSON") from None
    if not isinstance(body, dict):
        raise AdRejected("not a JSON object")
    return body


def redis_client(url: str, timeout_s: float):
    """An asyncio client for any TANDEM_REDIS_URL form (kvstore/redis_url.py): every call
    bounded by timeout_s, no hidden retries, so a dead Redis costs one timeout."""
    return async_client(url, timeout_s)
