"""kvstore fixtures: one redis-server and one 3-master Redis Cluster per session (flushed per
test; `redis_url` runs a test against each), private ones for tests that kill them, a fake
clock, and a disk directory."""

from __future__ import annotations

import pytest

from tests.kvstore.helpers import FakeClock
from tests.redis_server import RedisServer
from tests.redis_topology import RedisClusterServers


@pytest.fixture(scope="session")
def redis_server():
    """Shared by the session; fails (never skips) when no redis-server binary exists."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster():
    """Three masters, no replicas, shared by the session."""
    with RedisClusterServers() as cluster:
        yield cluster


@pytest.fixture(params=["server", "cluster"])
def redis_url(request) -> str:
    """A flushed Redis: one server (redis://), then a cluster (redis+cluster://)."""
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        return cluster.url
    server = request.getfixturevalue("redis_server")
    with server.client() as client:
        client.flushall()
    return server.url


@pytest.fixture
def own_redis():
    """A server this test alone uses, so it may kill, pause and restart it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster this test alone uses, so it may kill its masters."""
    with RedisClusterServers(tmp_path / "cluster") as cluster:
        yield cluster


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def disk_dir(tmp_path):
    return tmp_path / "kv"
