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
connection error or timeout marks the server down (breaker.py): later calls miss at once until
the backoff window passes and one call probes. The URL forms (one server, TLS, Redis Cluster,
Sentinel) are in redis_url.py. On a cluster each master has its own breaker, so a dead master
costs only its keys, and a batch is split per master (redis_route.py); behind Sentinel a probe
reconnects, and so asks the sentinels where the master is now.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import TypeVar

from redis.exceptions import AskError, ClusterDownError, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvstore.breaker import Breaker
from kvstore.codec import Blob
from kvstore.redis_route import Node, make_route
from kvstore.resp import BulkReader

log = logging.getLogger(__name__)
T = TypeVar("T")
Part = Callable[[Node, list[str], list[int]], list]  # (node, its full keys, their indices)

# Errors that mean "the server is not there": the tier goes down. Anything else (OOM under
# noeviction, WRONGTYPE) is a per-call failure on a healthy server.
DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
# Error replies that mean "ask the cluster where this key lives now": a miss, and a map refresh.
# redis-py's parser gives them a class (MovedError is an AskError) and strips the prefix;
# resp.py's raw replies keep the prefix.
REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
REDIRECT_ERRORS = (AskError, TryAgainError, ClusterDownError)

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
    maps = False

    def __init__(self, url: str, breaker: Breaker, ttl_s: float = 3600.0,
                 timeout_s: float = 0.5, window: int = 4, cluster_id: str = "default") -> None:
        self.breaker = breaker
        self.prefix = kv_prefix(cluster_id)
        self._ttl_s = ttl_s
        # GETs in flight per connection: hides round trips to a remote server without making
        # the server buffer a whole batch (4 x 1.4 MB stays in cache; a 32-key MGET does not).
        self._window = window
        # RESP2: no push frames can interleave with the replies resp.py reads.
        self._route = make_route(url, breaker, timeout_s, protocol=2)
        self._lock = threading.Lock()  # guards the counters below
        self._put_errors = 0
        self._redirects = 0

    @property
    def up(self) -> bool:
        return self.breaker.up

    def _spread(self, keys: list[str], part: Part, miss: T) -> list[T]:
        """part() on every node that owns some of `keys`; a node that is down or fails leaves
        its keys at `miss`. Never raises."""
        full = [self.prefix + k for k in keys]
        out = [miss] * len(keys)
        for node, idx in self._route.split(full):
            got = self._guarded(node, part, [full[i] for i in idx], idx)
            for i, value in zip(idx, got or (), strict=False):
                out[i] = value
        return out

    def _guarded(self, node: Node, part: Part, keys: list[str], idx: list[int]) -> list | None:
        if not node.breaker.allow():
            return None
        try:
            result = part(node, keys, idx)
        except DOWN_ERRORS as exc:
            node.breaker.failed(exc)
            self._route.failed(node)
            return None
        except RedisError as exc:
            log.warning("kvstore redis call failed: %s", exc)
            result = None  # but the server answered, so it is up
        node.breaker.succeeded()
        return result

    def _reply_error(self, command: str, key: str, error: Exception) -> None:
        """An error reply for one key: a miss (or an unstored block), logged or rerouted."""
        if isinstance(error, REDIRECT_ERRORS) or str(error).startswith(REDIRECTS):
            with self._lock:
                self._redirects += 1
            self._route.redirected()
            log.debug("kvstore redis %s %s redirected: %s", command, key, error)
        else:
            log.warning("kvstore redis %s %s failed: %s", command, key, error)

    def contains(self, keys: list[str]) -> list[bool]:
        return self._spread(keys, self._exists, False) if keys else []

    def _exists(self, node: Node, keys: list[str], idx: list[int]) -> list[bool]:
        return [bool(r) for r in self._per_key(node, "EXISTS", keys)]

    def _per_key(self, node: Node, command: str, keys: list[str]) -> list:
        """`command key` for each key, pipelined on `node` (one key a command: on a cluster a
        multi-key command must not cross slots); an error reply is reported and becomes None."""
        pipe = node.client.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command(command, key)
        out = []
        for key, reply in zip(keys, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(reply, Exception):
                self._reply_error(command, key, reply)
                reply = None
            out.append(reply)
        return out

    def get_many(self, keys: list[str]) -> list[Blob | None]:
        return self._spread(keys, self._get, None) if keys else []

    def _get(self, node: Node, keys: list[str], idx: list[int]) -> list[Blob | None]:
        pool = node.client.connection_pool
        conn = pool.get_connection()
        try:
            return self._read_gets(node, conn, keys)
        except BaseException:
            conn.disconnect()  # replies may be left in the stream: never reuse it
            raise
        finally:
            pool.release(conn)

    def _read_gets(self, node: Node, conn, keys: list[str]) -> list[Blob | None]:
        """Keep up to `window` GETs in flight on one connection, reading each value with one
        recv_into (resp.py) instead of redis-py's copying parser."""
        sock = getattr(conn, "_sock", None)  # redis-py's socket (TLS-wrapped for rediss://)
        if sock is None:  # a redis-py without it: fall back to its own, slower parser
            pipe = node.client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            replies = pipe.execute(raise_on_error=False)
        else:
            replies = self._windowed(BulkReader(sock), conn, keys)
        out: list[Blob | None] = []
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, Exception):
                self._reply_error("GET", key, reply)
                reply = None
            out.append(reply)
        return out

    def _windowed(self, reader: BulkReader, conn, keys: list[str]) -> list:
        sent = min(self._window, len(keys))
        conn.send_packed_command(conn.pack_commands([("GET", k) for k in keys[:sent]]))
        replies = []
        for _ in keys:
            replies.append(reader.read_bulk())
            if sent < len(keys):
                conn.send_command("GET", keys[sent])
                sent += 1
        if reader.buffered:
            raise RedisConnectionError("unexpected bytes after the last reply")
        return replies

    def put_many(self, blobs: dict[str, Blob], ttl_s: float | None = None) -> int:
        """SET each blob with a TTL (ttl_s, else the tier default; 0 = none), pipelined per
        node; returns the bytes stored."""
        ttl = self._ttl_s if ttl_s is None else ttl_s
        px = max(1, int(ttl * 1000)) if ttl and ttl > 0 else None
        values = list(blobs.values())

        def store(node: Node, keys: list[str], idx: list[int]) -> list[int]:
            pipe = node.client.pipeline(transaction=False)
            for key, i in zip(keys, idx, strict=True):
                pipe.set(key, values[i], px=px)
            return self._count_stored(keys, [values[i] for i in idx],
                                      pipe.execute(raise_on_error=False))
        return sum(self._spread(list(blobs), store, 0)) if blobs else 0

    def _count_stored(self, keys: list[str], values: list[Blob], results: list) -> list[int]:
        stored = []
        for key, blob, result in zip(keys, values, results, strict=True):
            if isinstance(result, Exception):  # e.g. OOM under a noeviction policy, or MOVED
                with self._lock:
                    self._put_errors += 1
                self._reply_error("SET", key, result)
            stored.append(0 if isinstance(result, Exception) else memoryview(blob).nbytes)
        return stored

    def delete(self, keys: list[str]) -> None:
        if keys:
            self._spread(keys, self._unlink, None)

    def _unlink(self, node: Node, keys: list[str], idx: list[int]) -> list[None]:
        self._per_key(node, "UNLINK", keys)
        return [None] * len(keys)

    def close(self) -> None:
        try:
            self._route.close()
        except RedisError as exc:
            log.debug("closing redis client: %s", exc)

    def stats(self) -> dict:
        nodes = self._route.nodes()
        breakers = {id(b): b for b in [self.breaker, *(n.breaker for n in nodes)]}
        return {"up": self.breaker.up, "errors": sum(b.failures for b in breakers.values()),
                "put_errors": self._put_errors, "redirects": self._redirects,
                "nodes_down": sorted(n.name for n in nodes if not n.breaker.up)}
