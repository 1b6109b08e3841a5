"""TANDEM_REDIS_URL forms (kvstore/redis_url.py) and how the tier reads cluster error replies;
no server needed."""

from __future__ import annotations

import pytest
from redis.exceptions import ClusterDownError, MovedError, ResponseError

from kvstore.redis_url import RedisTarget, parse_redis_url
from tests.kvstore.helpers import redis_tier


@pytest.mark.parametrize("url, want", [
    ("redis://:pw@h:6379/2", RedisTarget("single", "redis://:pw@h:6379/2")),
    ("rediss://h", RedisTarget("single", "rediss://h")),
    ("redis+cluster://a:7000,b:7001", RedisTarget(
        "cluster", "redis+cluster://a:7000,b:7001", (("a", 7000), ("b", 7001)))),
    ("rediss+cluster://u:p%40ss@a,[::1]:7002/", RedisTarget(
        "cluster", "rediss+cluster://u:p%40ss@a,[::1]:7002/", (("a", 6379), ("::1", 7002)),
        username="u", password="p@ss", tls=True)),
    ("redis+sentinel://:pw@s1:26379,s2/mymaster/3", RedisTarget(
        "sentinel", "redis+sentinel://:pw@s1:26379,s2/mymaster/3",
        (("s1", 26379), ("s2", 26379)), "mymaster", 3, password="pw")),
])
def test_url_forms(url, want):
    assert parse_redis_url(url) == want


@pytest.mark.parametrize("url", [
    "http://h:1", "h:6379", "redis+sentinel://s1:26379", "redis+sentinel://s1/a/b/c",
    "redis+cluster://a:7000/0", "redis+cluster://a:port", "redis+cluster://a:1,,b:2",
])
def test_malformed_urls_are_refused(url):
    with pytest.raises(ValueError):
        parse_redis_url(url)


def test_password_stays_out_of_repr():
    assert "hunter2" not in repr(parse_redis_url("redis+cluster://:hunter2@a:7000"))


def test_redirect_replies_are_misses_that_reroute():
    tier = redis_tier("redis+cluster://127.0.0.1:1")
    for error in (MovedError("12 127.0.0.1:7001"), ClusterDownError("The cluster is down"),
                  ResponseError("ASK 12 127.0.0.1:7001")):  # the last as resp.py returns it
        tier._reply_error("GET", "k", error)
    tier._reply_error("SET", "k", ResponseError("OOM command not allowed"))
    assert tier.stats()["redirects"] == 3
