"""KV-aware routing with real processes: two decode workers that advertise themselves in Redis
under another name than the router's configured URLs (one worker each, not two), and the turns
of a conversation that follow its prefix to the worker holding it, with output equal to
`model.generate()`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.registry import DEFAULT_MODEL
from scripts.serving_targets import Server, free_port

TIMEOUT_S = 60.0


def decode_worker(tmp: Path, redis_url: str, i: int) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "tandem.cli", "decode", "--port", str(port), "--dtype",
            "float32", "--redis-url", redis_url, "--disk-cache-dir", str(tmp / f"kv-{i}"),
            "--advertise-url", f"http://localhost:{port}", "--torch-threads", "1"]
    return Server(f"decode-{i}", argv, port, "", "/health", tmp / f"decode-{i}.log")


def router(tmp: Path, redis_url: str, urls: list[str]) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "tandem.cli", "router", "--port", str(port), "--redis-url",
            redis_url, "--disk-cache-dir", str(tmp / "router-kv"), "--decode-urls",
            ",".join(urls), "--prefill-urls", "", "--route-policy", "kv",
            "--health-interval-s", "0.2"]
    return Server("router", argv, port, "", "/ready", tmp / "router.log")


def poll(what: str, fn, timeout: float = TIMEOUT_S):
    """fn() until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis):
    tmp = tmp_path_factory.mktemp("routing")
    workers = [decode_worker(tmp, redis.url, i) for i in range(2)]
    for w in workers:
        w.start(wait=False)
    try:
        for w in workers:
            w.wait_ready()
        with router(tmp, redis.url, [w.url for w in workers]) as r:
            yield r, workers
    finally:
        for w in workers:
            w.stop()


def listed(r: Server) -> list[dict]:
    return httpx.get(f"{r.url}/workers", timeout=5).json()["workers"]


def test_an_advertised_url_of_a_configured_worker_is_an_alias(cluster):
    r, workers = cluster

    def aliased():
        ws = listed(r)
        aliases = {w["url"]: w["alias_of"] for w in ws if w["alias_of"]}
        return aliases if len(ws) == 4 and len(aliases) == 2 else None
    aliases = poll("both advertised URLs to be aliases", aliased)
    assert aliases == {f"http://localhost:{w.port}": w.url for w in workers}
    ids = {w["url"]: w["instance_id"] for w in listed(r)}
    assert all(ids[a] == ids[b] and ids[a] for a, b in aliases.items())


def requests_served(w: Server) -> int:
    return httpx.get(f"{w.url}/health", timeout=5).json()["counters"]["requests_total"]


def summary_seen(r: Server, w: Server) -> bool:
    """The router holds the worker's current resident-page summary."""
    version = httpx.get(f"{w.url}/health", timeout=5).json()["kv_summary_version"]
    mine = next(x for x in listed(r) if x["url"] == w.url)
    return mine["kv_summary_version"] == version


def test_each_turn_goes_where_the_conversation_is(cluster, reference):
    r, workers = cluster
    doc = " ".join(f"Fact {i}: the number {i} is written {i * 7}." for i in range(40))
    messages = [{"role": "system", "content": doc}, {"role": "user", "content": "Fact 3?"}]
    holder = None
    for turn in range(3):
        before = [requests_served(w) for w in workers]
        resp = httpx.post(f"{r.url}/v1/chat/completions", timeout=120, json={
            "model": DEFAULT_MODEL, "messages": messages, "max_tokens": 12, "temperature": 0})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        want, _ = reference.chat(messages, 12)
        assert body["choices"][0]["message"]["content"] == want
        served = [requests_served(w) - b for w, b in zip(workers, before, strict=True)]
        assert sorted(served) == [0, 1]
        took = workers[served.index(1)]
        cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
        if holder is None:
            holder = took  # the first turn is cold: wherever the load said
        else:
            assert took is holder, f"turn {turn + 1} left the worker holding its prefix"
            assert cached >= 300  # the earlier turns' pages, found on that worker's device
        poll("the router to see the holder's summary", lambda w=holder: summary_seen(r, w))
        answer = body["choices"][0]["message"]["content"]
        messages = [*messages, {"role": "assistant", "content": answer},
                    {"role": "user", "content": f"And fact {turn + 5}?"}]
    metrics = httpx.get(f"{r.url}/metrics", timeout=5).text
    assert 'tandem:router_route_decisions_total{reason="prefix",role="decode"} 2.0' in metrics
