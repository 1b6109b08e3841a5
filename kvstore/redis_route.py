"""Where each key of a Redis tier call goes: the one server, or the master of the key's slot.

    SingleRoute    redis://, rediss://, redis+sentinel://    one Node, whose breaker is the tier's
    ClusterRoute   redis+cluster://                         a Node per master, each with a breaker
                                                            of its own; the tier's breaker guards
                                                            reading the slot map

    route.split(full_keys) -> [(node, [indices])]     no I/O but a due slot-map refresh

Block keys carry no hash tag, so a batch spreads over every master, and a dead master costs only
the keys in its slots (its node's breaker opens; the others keep serving). A key that moved
(MOVED/ASK during resharding or a failover) answers with an error reply, which the tier counts as
a miss and reports here: the map is read again, at most every REFRESH_MIN_S. A value is only ever
read from the node the map names, and a redirect is never followed with stale bytes in hand.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from kvstore.breaker import Breaker
from kvstore.redis_url import RedisTarget, node_client, parse_redis_url, sync_client

log = logging.getLogger(__name__)

REFRESH_MIN_S = 0.5  # between slot-map reads: a burst of MOVED replies costs one CLUSTER SLOTS


@dataclass(eq=False, slots=True)
class Node:
    name: str  # "host:port", or "redis" for the one server of a SingleRoute
    client: redis.Redis
    breaker: Breaker


class SingleRoute:
    def __init__(self, client: redis.Redis, breaker: Breaker) -> None:
        self.node = Node("redis", client, breaker)

    def split(self, keys: list[str]) -> list[tuple[Node, list[int]]]:
        return [(self.node, list(range(len(keys))))]

    def failed(self, node: Node) -> None:
        # Behind Sentinel, idle connections may still point at a master that has been replaced
        # (or demoted and back as a replica); dropping them makes every reconnect ask the
        # sentinels again. For one server they are dead anyway.
        node.client.connection_pool.disconnect(inuse_connections=False)

    def redirected(self) -> None:
        pass  # one server never redirects

    def nodes(self) -> list[Node]:
        return [self.node]

    def close(self) -> None:
        self.node.client.close()


class ClusterRoute:
    """Thread-safe: the slot map and the node table are replaced whole, never edited."""

    def __init__(self, target: RedisTarget, breaker: Breaker, timeout_s: float,
                 **conn_extra) -> None:
        self._target = target
        self._breaker = breaker
        self._timeout_s = timeout_s
        self._conn_extra = conn_extra
        self._nodes: dict[str, Node] = {}
        self._slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS  # slot -> master
        self._stale = True  # read the map before the next split (the first read is lazy)
        self._next_refresh = 0.0  # time.monotonic() seconds
        self._refreshing = threading.Lock()

    def split(self, keys: list[str]) -> list[tuple[Node, list[int]]]:
        self._refresh_if_due()
        slots = self._slots  # one snapshot for the whole batch
        groups: dict[str, tuple[Node, list[int]]] = {}
        for i, key in enumerate(keys):
            node = slots[key_slot(key.encode())]
            if node is not None:  # an uncovered slot: its keys miss
                groups.setdefault(node.name, (node, []))[1].append(i)
        return list(groups.values())

    def failed(self, node: Node) -> None:
        node.client.connection_pool.disconnect(inuse_connections=False)
        self._stale = True  # a replica may take its slots over: read the map again soon

    def redirected(self) -> None:
        self._stale = True

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def close(self) -> None:
        for node in self.nodes():
            node.client.close()

    def _refresh_if_due(self) -> None:
        if not self._stale or time.monotonic() < self._next_refresh:
            return
        if not self._refreshing.acquire(blocking=False):
            return  # another thread is reading it: this batch goes by the current map
        try:
            if not self._breaker.allow():
                return
            self._next_refresh = time.monotonic() + REFRESH_MIN_S
            try:
                self._slots = self._read_map()
            except (RedisError, OSError) as exc:
                self._breaker.failed(exc)
                return
            self._stale = False
            self._breaker.succeeded()
        finally:
            self._refreshing.release()

    def _read_map(self) -> list[Node | None]:
        """CLUSTER SLOTS from the first node that answers: masters whose breaker is closed,
        then the seeds, then the rest (each try costs at most one timeout)."""
        known = sorted(self._nodes.values(), key=lambda n: not n.breaker.up)
        seeds = [f"{h}:{p}" for h, p in self._target.nodes]
        names = dict.fromkeys([n.name for n in known if n.breaker.up] + seeds + list(self._nodes))
        error: Exception = RedisConnectionError("no redis cluster node to ask")
        for name in names:
            node = self._node(name)
            try:
                reply = node.client.execute_command("CLUSTER", "SLOTS")
            except (RedisError, OSError) as exc:
                error = exc
                continue
            return self._build(reply, name.rpartition(":")[0])
        raise error

    def _build(self, reply: list, asked_host: str) -> list[Node | None]:
        slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for start, end, master, *_replicas in reply:
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            if host in ("", "?"):  # the node does not know its own address: the one we asked
                host = asked_host
            slots[start:end + 1] = [self._node(f"{host}:{int(master[1])}")] * (end - start + 1)
        return slots

    def _node(self, name: str) -> Node:
        node = self._nodes.get(name)
        if node is None:
            host, _, port = name.rpartition(":")
            client = node_client(host, int(port), self._target, self._timeout_s,
                                 **self._conn_extra)
            node = Node(name, client, self._breaker.sibling(f"{self._breaker.name} node {name}"))
            self._nodes = {**self._nodes, name: node}  # copy on write: readers never lock
        return node


def make_route(url: str, breaker: Breaker, timeout_s: float,
               **conn_extra) -> SingleRoute | ClusterRoute:
    """Raises ValueError for a malformed URL; connects to nothing yet."""
    target = parse_redis_url(url)
    if target.mode == "cluster":
        return ClusterRoute(target, breaker, timeout_s, **conn_extra)
    return SingleRoute(sync_client(target, timeout_s, **conn_extra), breaker)
