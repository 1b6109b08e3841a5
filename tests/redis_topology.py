"""Throwaway multi-process Redis topologies for tests, built from RedisServer (redis_server.py):

    with RedisClusterServers(tmp_path) as cluster:        3 masters, no replicas, 16384 slots
        cluster.url                                      redis+cluster://127.0.0.1:p1,...
        cluster.node_for(key).kill()                     SIGKILL the master owning a key

    with RedisSentinelGroup(tmp_path) as group:          master + replica + one sentinel
        group.url                                        redis+sentinel://127.0.0.1:ps/tandem
        group.master.kill(); group.wait_failover()       the replica is promoted (~2 s)

The cluster runs with cluster-require-full-coverage no, as tandem's docs ask: a dead master
then costs only its own slots. Timings are short (node timeout 1 s, sentinel down-after 1 s) so
failures are noticed within a test; every wait polls a condition under a deadline.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.crc import key_slot

from tests.redis_server import RedisServer, free_port

READY_TIMEOUT_S = 30.0  # cluster gossip and sentinel discovery on a loaded 2-vCPU box
POLL_S = 0.05
SLOTS = 16384
SERVICE = "tandem"


def poll(check: Callable[[], object], timeout_s: float, what: str) -> object:
    """check() until it returns something truthy (errors count as not yet), under a deadline."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last error: {last})")


class _Group:
    """Owns a temp dir and the servers in it."""

    def __init__(self, workdir: str | Path | None, prefix: str) -> None:
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix=prefix) if workdir is None else workdir)
        self.servers: list[RedisServer] = []

    def _server(self, name: str, extra: list[str]) -> RedisServer:
        server = RedisServer(self.dir / name, extra_args=extra)
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()


class RedisClusterServers(_Group):
    def __init__(self, workdir: str | Path | None = None, masters: int = 3) -> None:
        super().__init__(workdir, "tandem-redis-cluster-")
        self.masters = masters

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def start(self) -> RedisClusterServers:
        bus_ports = []
        for i in range(self.masters):
            node_dir = self.dir / f"node{i}"
            bus_ports.append(free_port())  # the bus port, not data port + 10000 (may pass 65535)
            self._server(f"node{i}", [
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-port", str(bus_ports[-1]),
                "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no"])
        self._assign_slots()
        try:
            poll(lambda: self._meet(bus_ports), READY_TIMEOUT_S, "every node to know every other")
            for server in self.servers:
                poll(lambda s=server: self._formed(s), READY_TIMEOUT_S, "cluster_state:ok")
        except AssertionError as exc:
            logs = "\n".join(f"--- node {s.port}\n{s.log_tail()}" for s in self.servers)
            raise AssertionError(f"{exc}\n{logs}") from None
        return self

    def _assign_slots(self) -> None:
        """Contiguous equal ranges, one per master, each with its own config epoch (what
        `redis-cli --cluster create` does, minus its unbounded wait for the join)."""
        for i, server in enumerate(self.servers):
            first, last = SLOTS * i // self.masters, SLOTS * (i + 1) // self.masters - 1
            with server.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)

    def _meet(self, bus_ports: list[int]) -> bool:
        """True once node 0 is connected to all others; else (re)sends the missing MEETs.
        Sent again because a handshake that outlives the 1 s node timeout on a loaded box is
        dropped, and one MEET is all `redis-cli --cluster create` ever sends."""
        with self.servers[0].client() as client:
            nodes = client.execute_command("CLUSTER", "NODES").decode()
            joined = {int(line.split()[1].split(":")[1].split("@")[0])
                      for line in nodes.splitlines() if " connected" in line
                      and "handshake" not in line.split()[2]}
            missing = [(s.port, bus) for s, bus in zip(self.servers, bus_ports, strict=True)
                       if s.port not in joined]
            for port, bus in missing:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
        return not missing

    def _formed(self, server: RedisServer) -> bool:
        with server.client() as client:
            info = client.execute_command("CLUSTER", "INFO").decode()
        return ("cluster_state:ok" in info
                and f"cluster_known_nodes:{self.masters}" in info)

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.servers]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(self.addresses)

    def node_for(self, key: str | bytes) -> RedisServer:
        """The master that owns key's slot (asked of a live node)."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        live = next(s for s in self.servers if s.running)
        with live.client() as client:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(s for s in self.servers if s.port == int(master[1]))
        raise LookupError(f"slot {slot} is not covered")

    def flushall(self) -> None:
        for server in self.servers:
            if server.running:
                with server.client() as client:
                    client.flushall()

    def keys(self) -> list[bytes]:
        out: list[bytes] = []
        for server in self.servers:
            with server.client() as client:
                out += client.keys()
        return out


class SentinelServer(RedisServer):
    """redis-server --sentinel watching one master; its config file is its own to rewrite."""

    def __init__(self, workdir: Path, master_port: int) -> None:
        super().__init__(workdir)
        self.master_port = master_port

    def _args(self) -> list[str]:
        conf = self.dir / "sentinel.conf"
        conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}",
            f"logfile {self.dir / 'redis.log'}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 1",  # quorum 1: it alone
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 3000", ""]))
        return [self.binary, str(conf), "--sentinel"]


class RedisSentinelGroup(_Group):
    def __init__(self, workdir: str | Path | None = None) -> None:
        super().__init__(workdir, "tandem-redis-sentinel-")

    def __enter__(self) -> RedisSentinelGroup:
        return self.start()

    def start(self) -> RedisSentinelGroup:
        self.master = self._server("master", [])
        self.replica = self._server("replica", ["--replicaof", "127.0.0.1",
                                                str(self.master.port)])
        poll(lambda: self._link_up(self.replica), READY_TIMEOUT_S, "the replica's sync")
        self.sentinel = SentinelServer(self.dir / "sentinel", self.master.port)
        self.servers.append(self.sentinel)
        self.sentinel.start()
        poll(self._sees_replica, READY_TIMEOUT_S, "the sentinel to find the replica")
        return self

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{SERVICE}"

    def _sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel.port, socket_timeout=1.0, decode_responses=True)

    @staticmethod
    def _link_up(server: RedisServer) -> bool:
        with server.client() as client:
            return client.info("replication").get("master_link_status") == "up"

    def _sees_replica(self) -> bool:
        with self._sentinel() as client:
            replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)
        return any("s_down" not in str(r) for r in replicas)

    def master_port(self) -> int:
        """The port the sentinel currently names as master."""
        with self._sentinel() as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def failover(self) -> RedisServer:
        """SENTINEL FAILOVER (the master stays up and becomes a replica); returns the new
        master. Retried: the sentinel refuses while its view of the replica is stale (its INFO
        is read every 10 s)."""
        old_port = self.master_port()
        with self._sentinel() as client:
            poll(lambda: client.execute_command("SENTINEL", "FAILOVER", SERVICE),
                 READY_TIMEOUT_S, "the sentinel to accept a failover")
        return self.wait_failover(old_port)

    def wait_failover(self, old_port: int, timeout_s: float = READY_TIMEOUT_S) -> RedisServer:
        """Until the sentinel names another master and that server says it is one."""
        def promoted() -> RedisServer | None:
            port = self.master_port()
            server = next(s for s in (self.master, self.replica) if s.port == port)
            with server.client() as client:
                role = client.info("replication")["role"]
            return server if port != old_port and role == "master" else None
        return poll(promoted, timeout_s, "the sentinel's failover")  # type: ignore[return-value]
