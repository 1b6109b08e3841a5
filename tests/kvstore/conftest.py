"""kvstore fixtures: one redis-server per session (flushed per test), a private one for tests
that kill it, a fake clock, and a disk directory."""

from __future__ import annotations

import pytest

from tests.kvstore.helpers import FakeClock
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    """Shared by the session; fails (never skips) when no redis-server binary exists."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def own_redis():
    """A server this test alone uses, so it may kill, pause and restart it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def disk_dir(tmp_path):
    return tmp_path / "kv"
