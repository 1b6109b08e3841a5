"""`tandem serve --redis-url redis+cluster://...` on a real 3-master Redis Cluster: prefixes are
reused through it, workers are listed through it, and a master SIGKILLed mid-stream costs only
recomputes (the store misses), never a wrong answer."""

from __future__ import annotations

import threading

import httpx

from tests.e2e.stack import Stack
from tests.e2e.test_serving import post
from tests.e2e.test_serving import test_prefix_reuse_computes_only_new_tokens as check_reuse
from tests.redis_topology import RedisClusterServers
from wire.membership import registry_key

REQUESTS = 10
KILL_DURING = 3  # the master dies while this request (0-based) is in flight


def kv_keys_per_node(cluster: RedisClusterServers) -> list[int]:
    out = []
    for server in cluster.servers:
        with server.client() as client:
            out.append(sum(1 for _ in client.scan_iter(match="tandem:default:kv:*")))
    return out


def test_prefix_reuse_through_a_redis_cluster(tmp_path, reference):
    with RedisClusterServers(tmp_path / "cluster") as cluster, \
         Stack(tmp_path, "--redis-url", cluster.url,
               env={"TANDEM_STORE_TIERS": "memory+redis"}) as s:
        check_reuse(s, reference)
        per_node = kv_keys_per_node(cluster)
        assert sum(n > 0 for n in per_node) >= 2, per_node  # blocks spread over the masters
        ads = cluster.node_for(registry_key("default"))  # heartbeats listed both workers
        with ads.client() as client:
            assert client.zcard(registry_key("default")) == 2


def computed(stack: Stack) -> dict[str, int]:
    return {h["role"]: h["counters"]["prompt_tokens_computed_total"]
            for role in ("prefill", "decode") for h in stack.worker_health(role)}


def chat(i: int) -> list[dict]:
    """A prompt of its own (no prefix shared with another request), long enough for the
    prefill hop: its KV reaches the decode worker only through the store."""
    doc = " ".join(f"Note {i}.{j}: item {j} costs {i * 7 + j} coins." for j in range(30))
    return [{"role": "system", "content": doc}, {"role": "user", "content": "What costs 9?"}]


def test_killed_master_costs_recomputes_never_wrong_outputs(tmp_path, reference):
    """Reports how many requests fell back to recompute (the decode worker computed at least a
    block of prompt itself because the handoff missed in Redis)."""
    with RedisClusterServers(tmp_path / "cluster") as cluster, \
         Stack(tmp_path, "--redis-url", cluster.url,
               env={"TANDEM_STORE_TIERS": "memory+redis"}) as s:
        victim = cluster.servers[1]
        block = s.worker_health("decode")[0]["block_size"]
        fallbacks, wrong = [], []
        for i in range(REQUESTS):
            before = computed(s)
            if i == KILL_DURING:
                threading.Timer(0.3, victim.kill).start()
            r = post(s, "/v1/chat/completions", {"messages": chat(i), "max_tokens": 8,
                                                  "temperature": 0})
            assert r.status_code == 200, r.text
            if r.json()["choices"][0]["message"]["content"] != reference.chat(chat(i), 8)[0]:
                wrong.append(i)
            if computed(s)["decode"] - before["decode"] >= block:
                fallbacks.append(i)
        print(f"\nredis cluster master killed during request {KILL_DURING} of {REQUESTS}: "
              f"{len(fallbacks)} request(s) fell back to recompute {fallbacks}; "
              f"{len(wrong)} wrong output(s)")
        assert not wrong
        assert all(i >= KILL_DURING for i in fallbacks)  # none before the kill
        assert fallbacks, "no request touched the dead master's slots"
        assert httpx.get(f"{s.url}/ready", timeout=5).status_code == 200
