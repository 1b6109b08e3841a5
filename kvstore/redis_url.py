"""The one place a TANDEM_REDIS_URL becomes a redis-py client (sync for the KV tier, async for
worker membership).

    redis://[[user]:password@]host[:port][/db]          one server (redis-py's from_url)
    rediss://...                                        the same over TLS
    redis+cluster://[[user]:password@]host:port[,host:port...]
                                                        Redis Cluster; the hosts are seeds, the
                                                        rest is found with CLUSTER SLOTS
    rediss+cluster://...                                the same over TLS
    redis+sentinel://[[user]:password@]host:port[,host:port...]/<service>[/db]
                                                        the master Sentinel names for <service>;
                                                        user and password are the master's (the
                                                        sentinels themselves take none)

Every client is bounded the same way: each socket operation and connect by `timeout_s`,
redis-py's own retries off (Retry(NoBackoff(), 0)), no background health checks. A cluster
client still follows MOVED/ASK redirects (that is routing, not a retry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

Mode = Literal["single", "cluster", "sentinel"]
SCHEMES: dict[str, tuple[Mode, bool]] = {  # scheme -> (mode, TLS)
    "redis": ("single", False), "rediss": ("single", True), "unix": ("single", False),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
}
DEFAULT_PORTS = {"cluster": 6379, "sentinel": 26379}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed URL. `nodes` are the cluster's seeds or the sentinels (host, port)."""

    mode: Mode
    url: str = field(repr=False)  # may carry the password
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @property
    def auth(self) -> dict:
        return {"username": self.username, "password": self.password}


def parse_redis_url(url: str) -> RedisTarget:
    """Raises ValueError for an unknown scheme or a malformed host list."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError(f"redis URL must start with one of {sorted(SCHEMES)}://, got {url!r}")
    mode, tls = SCHEMES[scheme.lower()]
    if mode == "single":
        return RedisTarget("single", url)
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = tuple(_host_port(h, DEFAULT_PORTS[mode]) for h in hosts.split(","))
    path = [p for p in parts.path.split("/") if p]
    service, db = "", 0
    if mode == "sentinel":
        if not 1 <= len(path) <= 2:
            raise ValueError(f"sentinel URL needs /<service>[/db], got {url!r}")
        service, db = unquote(path[0]), int(path[1]) if len(path) == 2 else 0
    elif path:
        raise ValueError(f"a cluster has no databases: drop the path of {url!r}")
    return RedisTarget(mode, url, nodes, service, db, unquote(user) or None,
                       unquote(password) if userinfo else None, tls)


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # an IPv6 literal: [::1]:7000
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad host:port {text!r} in redis URL")
    return host, int(port) if port else default_port


def bounded(timeout_s: float) -> dict:
    """Connection options every tandem Redis client shares (see the module docstring)."""
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}


def node_client(host: str, port: int, target: RedisTarget, timeout_s: float,
                **extra) -> redis.Redis:
    """A plain client for one server of a cluster (the KV tier routes keys itself)."""
    return redis.Redis(host=host, port=port, ssl=target.tls, **target.auth,
                       **bounded(timeout_s), **extra)


def sync_client(url: str | RedisTarget, timeout_s: float, **extra):
    """A redis.Redis (single server, or Sentinel's current master) or a RedisCluster.

    extra: more connection options (the KV tier passes protocol=2). Building a RedisCluster
    reads the slot map, so it raises if no seed answers; the others connect on first use."""
    target = url if isinstance(url, RedisTarget) else parse_redis_url(url)
    if target.mode == "single":
        return redis.Redis.from_url(target.url, **bounded(timeout_s), **extra)
    if target.mode == "sentinel":
        from redis.sentinel import Sentinel
        sentinel = Sentinel(target.nodes, **bounded(timeout_s))
        return sentinel.master_for(target.service, db=target.db, **target.auth,
                                   **bounded(timeout_s), **extra)
    from redis.cluster import ClusterNode, RedisCluster
    options = {k: v for k, v in bounded(timeout_s).items() if k != "retry"}
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
                        retry=Retry(NoBackoff(), 0), require_full_coverage=False,
                        ssl=target.tls, **target.auth, **options, **extra)


def async_client(url: str, timeout_s: float):
    """The asyncio twin of sync_client (worker membership). Nothing connects until first use."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry as AsyncRetry

    target = parse_redis_url(url)
    options = {**bounded(timeout_s), "retry": AsyncRetry(NoBackoff(), 0)}
    if target.mode == "single":
        return aioredis.Redis.from_url(target.url, **options)
    if target.mode == "sentinel":
        from redis.asyncio.sentinel import Sentinel
        sentinel = Sentinel(target.nodes, **options)
        return sentinel.master_for(target.service, db=target.db, **target.auth, **options)
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
                        require_full_coverage=False, ssl=target.tls, **target.auth, **options)
