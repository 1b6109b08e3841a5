"""KV-aware routing and worker identity in the router's pool, against scripted workers
(httpx.MockTransport): a request goes where its prefix is resident unless loads are skewed;
summaries are fetched only when they change; two URLs of one process are one worker."""

from __future__ import annotations

import asyncio
import base64

import httpx

from engine.page_hash import chain_root, extend_chain
from engine.resident_filter import HASHES, ResidentFilter
from router.dispatch.kv_route import KVRouter, RoutePrefix
from router.dispatch.pool import WorkerPool
from wire.membership import WorkerAd

D1, D2, D3 = "http://d1:1", "http://d2:1", "http://d3:1"
P = 16
DOC = list(range(100, 100 + 10 * P + 3))  # 10 full pages that can match


def page_digests(tokens: list[int], salt: str = "") -> list[bytes]:
    out: list[bytes] = []
    extend_chain(out, chain_root("fp", "float32", P, salt), tokens, P, (len(tokens) - 1) // P)
    return out


class Workers:
    """/health and /kv_summary per URL: `instance[url]`, `held[url]` (digests resident)."""

    def __init__(self, urls: list[str]):
        self.instance = {u: f"inst-{u[-4:-2]}" for u in urls}
        self.held: dict[str, list[bytes]] = {u: [] for u in urls}
        self.version = dict.fromkeys(urls, 1)
        self.summary_calls: list[str] = []
        self.down: set[str] = set()  # URLs whose /health answers 500

    def handler(self, request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if url in self.down:
            return httpx.Response(500)
        if request.url.path == "/health":
            return httpx.Response(200, json={
                "role": "decode", "model": "m", "pid": 1, "fingerprint": "fp",
                "dtype": "float32", "block_size": 64, "max_model_len": 4096, "running": 0,
                "waiting": 0, "counters": {}, "instance_id": self.instance[url],
                "page_size": P, "kv_summary_version": self.version[url]})
        assert request.url.path == "/kv_summary"
        self.summary_calls.append(url)
        f = ResidentFilter(num_pages=256)
        for d in self.held[url]:
            f.add(d)
        return httpx.Response(200, json={
            "version": self.version[url], "page_size": P, "bits": f.bits, "hashes": HASHES,
            "packed": base64.b64encode(f.packed()).decode()})


def pool_of(workers: Workers, urls: list[str], policy: str = "kv", load_tokens: int = 256,
            balance_abs: int = 8) -> WorkerPool:
    client = httpx.AsyncClient(transport=httpx.MockTransport(workers.handler))
    return WorkerPool(client, [], urls, router=KVRouter(policy, load_tokens, balance_abs))


def test_the_worker_holding_the_prefix_wins():
    workers = Workers([D1, D2, D3])
    workers.held[D2] = page_digests(DOC)
    pool = pool_of(workers, [D1, D2, D3])
    asyncio.run(pool.refresh())
    turn2 = DOC + [7, 8, 9]
    assert pool.pick("decode", prefix=RoutePrefix(turn2, "")).url == D2
    # Nobody holds another tenant's pages: least loaded (all idle: the first).
    assert pool.pick("decode", prefix=RoutePrefix(turn2, "tenant-b")).url == D1
    stats = pool.router.stats
    assert stats.decisions == {("decode", "prefix"): 1, ("decode", "load"): 1}
    assert stats.matched_tokens["decode"] == 10 * P


def test_load_outweighs_a_short_match_and_skew_falls_back_to_least_loaded():
    workers = Workers([D1, D2])
    workers.held[D2] = page_digests(DOC)[:2]  # 32 tokens
    pool = pool_of(workers, [D1, D2], load_tokens=64, balance_abs=3)
    asyncio.run(pool.refresh())
    d1, d2 = sorted(pool.workers(), key=lambda w: w.url)
    d2.inflight = 1  # 64 tokens' worth of load against 32 matched
    assert pool.pick("decode", prefix=RoutePrefix(DOC, "")).url == D1
    workers.held[D2] = page_digests(DOC)
    workers.version[D2] = 2
    asyncio.run(pool.refresh())
    assert pool.pick("decode", prefix=RoutePrefix(DOC, "")).url == D2  # 160 matched > 64
    d2.inflight = 5  # skewed past balance_abs: the least loaded whatever it holds
    assert pool.pick("decode", prefix=RoutePrefix(DOC, "")).url == D1
    assert pool.router.stats.decisions[("decode", "balance")] == 1


def test_least_loaded_policy_ignores_summaries_and_never_fetches_them():
    workers = Workers([D1, D2])
    workers.held[D2] = page_digests(DOC)
    pool = pool_of(workers, [D1, D2], policy="least_loaded")
    asyncio.run(pool.refresh())
    assert pool.pick("decode", prefix=RoutePrefix(DOC, "")).url == D1
    assert workers.summary_calls == []


def test_a_summary_is_fetched_again_only_when_its_version_changes():
    workers = Workers([D1])
    pool = pool_of(workers, [D1])
    for _ in range(3):
        asyncio.run(pool.refresh())
    assert workers.summary_calls == [D1]
    workers.version[D1] = 2
    asyncio.run(pool.refresh())
    assert workers.summary_calls == [D1, D1]


def test_a_malformed_summary_is_ignored():
    workers = Workers([D1])
    real = workers.handler

    def bad(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/kv_summary":
            return httpx.Response(200, json={"version": 1, "page_size": P, "bits": 1000,
                                             "hashes": HASHES, "packed": "AAAA"})
        return real(request)
    client = httpx.AsyncClient(transport=httpx.MockTransport(bad))
    pool = WorkerPool(client, [], [D1], router=KVRouter("kv"))
    asyncio.run(pool.refresh())
    [w] = pool.workers()
    assert w.healthy and w.resident is None
    assert pool.pick("decode", prefix=RoutePrefix(DOC, "")).url == D1


def test_two_urls_of_one_process_are_one_worker():
    """compose: the router is configured with the service address, and the worker advertises
    its container hostname. Load is counted once and a failover never retries it."""
    workers = Workers([D1, D2, D3])
    workers.instance[D2] = workers.instance[D1]  # D2 is D1's advertised URL
    pool = pool_of(workers, [D1, D3])
    pool.sync_members([WorkerAd(url=D2, role="decode", pid=1, model="m",
                                instance_id=workers.instance[D1])])
    asyncio.run(pool.refresh())
    by_url = {w.url: w for w in pool.workers()}
    assert by_url[D2].alias_of == D1 and by_url[D1].alias_of is None  # configured URL kept
    assert pool.pick_or_none("decode", exclude={D1, D3}) is None  # not "elsewhere"
    by_url[D1].inflight = 3
    assert pool.pick("decode").url == D3
    # The configured address stops answering: the advertised one carries the worker.
    workers.down.add(D1)
    pool.mark_failed(by_url[D1])
    asyncio.run(pool.refresh())
    assert by_url[D2].alias_of is None and not by_url[D1].healthy
    assert pool.pick("decode", exclude={D3}).url == D2
    assert by_url[D2].summary()["instance_id"] == workers.instance[D1]
