"""Redis tier: shared across hosts, outlives any worker, bounded by TTL and `maxmemory`.

Every key lives under its cluster's prefix, so stacks with different cluster ids can share one
Redis without ever reading (or evicting on purpose) each other's blocks:

    tandem:<cluster_id>:kv:<store key>    ->  blob     (store key: tandem@<fp>@...@<hash>)

One Redis string per block holds the whole blob (header, key, checksum and bytes), written by a
single SET. So a block's bytes are never visible before its metadata (they are one value), and
an LRU/LFU `maxmemory` policy evicts both together. (LMCache writes bytes then a metadata key,
which two-key eviction can split; here a reader at worst finds a key missing, or a value that
fails decoding, which is a counted miss and gets deleted.)

Faults: every socket operation is bounded by `timeout_s`, redis-py's own retries are off, and a
connection error or timeout marks the tier down (breaker.py): later calls miss at once until the
backoff window passes and one call probes. `redis://`, `rediss://` (TLS) and password URLs
(`redis://:secret@host:6379/0`, `redis://user:secret@host`) all go through redis-py's from_url.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from kvstore.breaker import Breaker
from kvstore.codec import Blob
from kvstore.resp import BulkReader

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that mean "the server is not there": the tier goes down. Anything else (OOM under
# noeviction, WRONGTYPE) is a per-call failure on a healthy server.
DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

# A cluster id is part of every Redis key: short, and free of the ':' and glob characters
# that would let one id's keys (or a SCAN pattern over them) reach into another's.
CLUSTER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"


def kv_prefix(cluster_id: str) -> str:
    """The prefix of this cluster's block and tail keys in Redis."""
    if not re.fullmatch(CLUSTER_ID_PATTERN, cluster_id):
        raise ValueError(f"cluster id must match {CLUSTER_ID_PATTERN}, got {cluster_id!r}")
    return f"tandem:{cluster_id}:kv:"


class RedisTier:
    name = "redis"
    verify = True
    retains = False

    def __init__(self, url: str, breaker: Breaker, ttl_s: float = 3600.0,
                 timeout_s: float = 0.5, window: int = 4, cluster_id: str = "default") -> None:
        self.breaker = breaker
        self.prefix = kv_prefix(cluster_id)
        self._ttl_s = ttl_s
        # GETs in flight per connection: hides round trips to a remote server without making
        # the server buffer a whole batch (4 x 1.4 MB stays in cache; a 32-key MGET does not).
        self._window = window
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
            protocol=2)  # RESP2: no push frames can interleave with the replies resp.py reads
        self._pool = self._client.connection_pool
        self._lock = threading.Lock()  # guards _put_errors
        self._put_errors = 0

    @property
    def up(self) -> bool:
        return self.breaker.up

    def _call(self, fn: Callable[[], T], default: T) -> T:
        """Run fn against the server unless the tier is down; never raises."""
        if not self.breaker.allow():
            return default
        try:
            result = fn()
        except DOWN_ERRORS as exc:
            self.breaker.failed(exc)
            return default
        except RedisError as exc:
            log.warning("kvstore redis call failed: %s", exc)
            result = default  # but the server answered, so the tier is up
        self.breaker.succeeded()
        return result

    def contains(self, keys: list[str]) -> list[bool]:
        def run() -> list[bool]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self.prefix + key)
            return [bool(n) for n in pipe.execute()]
        return self._call(run, [False] * len(keys)) if keys else []

    def get_many(self, keys: list[str]) -> list[Blob | None]:
        return self._call(lambda: self._get_pipelined(keys), [None] * len(keys)) if keys else []

    def _get_pipelined(self, keys: list[str]) -> list[Blob | None]:
        conn = self._pool.get_connection()
        try:
            return self._read_gets(conn, [self.prefix + k for k in keys])
        except BaseException:
            conn.disconnect()  # replies may be left in the stream: never reuse it
            raise
        finally:
            self._pool.release(conn)

    def _read_gets(self, conn, keys: list[str]) -> list[Blob | None]:
        """Keep up to `window` GETs in flight on one connection, reading each value with one
        recv_into (resp.py) instead of redis-py's copying parser."""
        sock = getattr(conn, "_sock", None)  # redis-py's socket (TLS-wrapped for rediss://)
        if sock is None:  # a redis-py without it: fall back to its own, slower parser
            return list(self._client.mget(keys))
        reader = BulkReader(sock)
        sent = min(self._window, len(keys))
        conn.send_packed_command(conn.pack_commands([("GET", k) for k in keys[:sent]]))
        out: list[Blob | None] = []
        for key in keys:
            reply = reader.read_bulk()
            if sent < len(keys):
                conn.send_command("GET", keys[sent])
                sent += 1
            if isinstance(reply, ResponseError):
                log.warning("kvstore redis GET %s failed: %s", key, reply)
                reply = None
            out.append(reply)
        if reader.buffered:
            raise RedisConnectionError("unexpected bytes after the last reply")
        return out

    def put_many(self, blobs: dict[str, Blob], ttl_s: float | None = None) -> int:
        """SET each blob with a TTL (ttl_s, else the tier default; 0 = none), pipelined."""
        ttl = self._ttl_s if ttl_s is None else ttl_s
        px = max(1, int(ttl * 1000)) if ttl and ttl > 0 else None

        def run() -> int:
            pipe = self._client.pipeline(transaction=False)
            for key, blob in blobs.items():
                pipe.set(self.prefix + key, blob, px=px)
            results = pipe.execute(raise_on_error=False)
            return self._count_stored(blobs, results)
        return self._call(run, 0) if blobs else 0

    def _count_stored(self, blobs: dict[str, Blob], results: list) -> int:
        stored = 0
        for (key, blob), result in zip(blobs.items(), results, strict=True):
            if isinstance(result, Exception):  # e.g. OOM under a noeviction policy
                with self._lock:
                    self._put_errors += 1
                log.warning("kvstore redis SET %s failed: %s", key, result)
            else:
                stored += memoryview(blob).nbytes
        return stored

    def delete(self, keys: list[str]) -> None:
        if keys:
            self._call(lambda: self._client.unlink(*(self.prefix + k for k in keys)), 0)

    def close(self) -> None:
        try:
            self._client.close()
        except RedisError as exc:
            log.debug("closing redis client: %s", exc)

    def stats(self) -> dict:
        return {"up": self.breaker.up, "errors": self.breaker.failures,
                "put_errors": self._put_errors}
