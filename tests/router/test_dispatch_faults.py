"""The dispatcher's fault handling against scripted workers (httpx.MockTransport, no model):
decode resume, prefill fallback, refusals, the failover budget, circuits and membership."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient

from engine.sampling_params import SamplingParams
from router.app import create_app
from router.dispatch import disaggregated as dispatch
from router.dispatch.backend import (
    BackendOverloaded,
    BackendRejected,
    BackendUnavailable,
    GenerateRequest,
)
from router.dispatch.disaggregated import DisaggregatedBackend
from router.dispatch.pool import WorkerPool
from router.dispatch.worker_info import worker_breaker
from router.settings import RouterSettings
from tests.kvstore.helpers import FakeClock
from tests.router.conftest import MODEL
from wire.membership import WorkerAd

P, D1, D2 = "http://p:1", "http://d1:1", "http://d2:1"
PROMPT = list(range(10, 20))  # under a block: no prefill hop unless a test says so


def health(role: str, pid: int = 1, model: str = "m") -> dict:
    fingerprint = "fp" if model == "m" else f"fp-{model}"
    return {"role": role, "model": model, "pid": pid, "fingerprint": fingerprint,
            "dtype": "float32", "block_size": 4, "max_model_len": 512, "running": 0,
            "waiting": 0, "counters": {}}


def ndjson(tokens: list[int], finish_at: int | None, cut: bool = False):
    """A /generate body: one line per token, the last finishing, or cut off mid-stream."""
    async def body():
        for i, t in enumerate(tokens):
            line = {"token_id": t}
            if i + 1 == finish_at:
                line["finish_reason"] = "length"
            yield (json.dumps(line) + "\n").encode()
        if cut:
            raise httpx.RemoteProtocolError("peer closed connection")
    return body()


class Workers:
    """Scripted workers: `generate[url]` maps a /generate body to a Response; every call is
    recorded as (url, path, json body)."""

    def __init__(self, generate: dict[str, Callable[[dict], httpx.Response]],
                 prefill: dict[str, Callable[[dict], httpx.Response]] | None = None):
        self.generate = generate
        self.prefill = prefill or {}
        self.health_status: dict[str, int] = {}  # url -> /health status (default 200)
        self.models: dict[str, str] = {}  # url -> the model its /health reports (default "m")
        self.calls: list[tuple[str, str, dict]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        path = request.url.path
        if path == "/health":
            return httpx.Response(self.health_status.get(url, 200),
                                  json=health("prefill" if url == P else "decode",
                                              model=self.models.get(url, "m")))
        body = json.loads(request.content)
        self.calls.append((url, path, body))
        if path == "/abort":
            return httpx.Response(204)
        return (self.generate if path == "/generate" else self.prefill)[url](body)

    def paths(self, path: str) -> list[str]:
        return [url for url, p, _ in self.calls if p == path]


def dispatch_settings(prefill: bool = False, **settings) -> RouterSettings:
    return RouterSettings(_env_file=None, prefill_urls=[P] if prefill else [],
                          prefix_cache=False,
                          **{"decode_urls": [D1, D2], "health_interval_s": 0.05,
                             "local_prefill_tokens": 4, "max_failovers": 2, **settings})


def run(workers: Workers, fn, prefill: bool = False, **settings):
    """Start a backend over the scripted workers, run `await fn(backend)`, close it."""
    settings = dispatch_settings(prefill, **settings)

    async def main():
        backend = DisaggregatedBackend(settings, transport=httpx.MockTransport(workers.handler))
        await backend.start()
        try:
            return await fn(backend)
        finally:
            await backend.close()

    return asyncio.run(main())


def request(max_tokens: int = 6) -> GenerateRequest:
    return GenerateRequest("req-1", "m", list(PROMPT), SamplingParams(max_tokens=max_tokens,
                                                                      seed=1))


async def tokens(backend: DisaggregatedBackend, req: GenerateRequest | None = None) -> list[int]:
    return [ev.token_id async for ev in backend.generate(req or request())]


def test_broken_decode_stream_resumes_elsewhere_with_tokens_so_far():
    first = {D1: None}

    def d1(body):
        first[D1] = body
        return httpx.Response(200, content=ndjson([1, 2, 3], None, cut=True))

    def d2(body):
        assert body["token_ids"] == PROMPT + [1, 2, 3]  # the prompt + what was streamed
        assert body["num_prompt_tokens"] == len(PROMPT)
        assert body["request_id"] == first[D1]["request_id"]  # idempotent: same id
        return httpx.Response(200, content=ndjson([4, 5, 6], 3))

    workers = Workers({D1: d1, D2: d2})

    async def go(backend):
        got = await tokens(backend)
        return got, backend.failovers_total

    got, failovers = run(workers, go)
    assert got == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing repeated
    assert failovers == 1
    assert workers.paths("/generate") == [D1, D2]


def test_every_decode_worker_full_is_429_and_costs_no_budget():
    busy = lambda _: httpx.Response(429, headers={"Retry-After": "3"})  # noqa: E731
    workers = Workers({D1: busy, D2: busy})

    async def go(backend):
        with pytest.raises(BackendOverloaded) as err:
            await tokens(backend)
        return err.value.retry_after_s, backend.failovers_total

    assert run(workers, go) == (3, 0)
    assert sorted(workers.paths("/generate")) == [D1, D2]


def test_draining_worker_is_skipped():
    draining = lambda _: httpx.Response(503)  # noqa: E731
    ok = lambda _: httpx.Response(200, content=ndjson([7], 1))  # noqa: E731
    workers = Workers({D1: draining, D2: ok})
    workers.health_status[D1] = 503  # as a draining worker answers its probes

    async def go(backend):
        got = []
        for _ in range(2):
            got.append(await tokens(backend))
        return got, backend.failovers_total

    assert run(workers, go) == ([[7], [7]], 0)
    assert workers.paths("/generate").count(D1) <= 1  # once refused, out of rotation


def test_failover_budget_bounds_retries():
    broken = lambda _: httpx.Response(200, content=ndjson([1], None, cut=True))  # noqa: E731
    workers = Workers({D1: broken, D2: broken})

    async def go(backend):
        with pytest.raises(BackendUnavailable):
            await tokens(backend)
        return backend.failovers_total

    assert run(workers, go, max_failovers=2) == 2
    assert len(workers.paths("/generate")) == 3  # the first try + 2 failovers


def test_failed_prefill_falls_back_to_decode_prefilling():
    prompt = list(range(10, 30))  # 5 blocks of 4: worth a prefill hop

    def decode(body):
        assert body["token_ids"] == prompt and body["tail_key"] is None  # no first token
        return httpx.Response(200, content=ndjson([9, 8], 2))

    workers = Workers({D1: decode, D2: decode}, prefill={P: lambda _: httpx.Response(500)})
    req = GenerateRequest("r", "m", prompt, SamplingParams(max_tokens=2, seed=1))
    assert run(workers, lambda b: tokens(b, req), prefill=True) == [9, 8]
    assert workers.paths("/prefill") == [P]


def test_circuit_opens_after_consecutive_failures_and_half_opens():
    clock = FakeClock()
    b = worker_breaker(D1, clock)
    b.failed()
    b.failed()
    assert b.state() == "closed" and b.available()
    b.failed()
    clock.advance(1.0)
    assert b.state() == "open" and not b.available()
    clock.advance(4.0)
    assert b.state() == "half_open" and b.available()
    assert b.allow() and not b.available()  # one trial at a time
    b.failed()  # the trial failed: open again, twice as long
    clock.advance(9.5)
    assert b.state() == "open"
    clock.advance(0.5)
    assert b.state() == "half_open" and b.allow()
    b.end_trial()  # its lease ended without a verdict: the next request is the trial
    assert b.allow()
    b.succeeded()
    assert b.state() == "closed" and b.consecutive == 0


def test_membership_adds_advertised_workers_and_drops_lapsed_ones():
    pool = WorkerPool(httpx.AsyncClient(), [], [D1])
    ad = WorkerAd(url=D2, role="decode", pid=7, model="m")
    pool.sync_members([ad])
    [found] = [w for w in pool.workers() if w.url == D2]
    assert found.discovered and not found.healthy  # a probe must pass first
    found.healthy = True
    pool.sync_members([ad.model_copy(update={"draining": True})])
    assert not found.healthy
    pool.sync_members([])  # one listing without it: kept (a Redis restart forgets every ad)
    assert D2 in [w.url for w in pool.workers()]
    pool.sync_members([])
    assert D2 not in [w.url for w in pool.workers()]


def test_waiting_for_a_worker_after_a_failure_is_bounded(monkeypatch):
    """Both decode workers gone mid-stream: the request waits FAILOVER_WAIT_S for one to come
    back, then ends with a clean BackendUnavailable after the tokens it already streamed."""
    monkeypatch.setattr(dispatch, "FAILOVER_WAIT_S", 0.3)
    workers = Workers({D1: lambda _: httpx.Response(200, content=ndjson([1], None, cut=True)),
                       D2: lambda _: httpx.Response(500)})
    workers.health_status[D2] = 503

    async def go(backend):
        workers.health_status[D1] = 503  # D1 dies with its stream
        got, start = [], time.monotonic()
        with pytest.raises(BackendUnavailable, match="recovered"):
            async for ev in backend.generate(request()):
                got.append(ev.token_id)
        return got, time.monotonic() - start

    got, seconds = run(workers, go)
    assert got == [1] and seconds < 3


def test_discovered_worker_with_another_model_is_kept_out():
    def handler(request: httpx.Request) -> httpx.Response:
        h = health("decode")
        if request.url.host == "d2":
            h["fingerprint"] = "another-model"
        return httpx.Response(200, json=h)

    async def main() -> tuple[bool, bool]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            pool = WorkerPool(client, [], [D1])
            await pool.refresh()
            pool.sync_members([WorkerAd(url=D2, role="decode", pid=2, model="other")])
            await pool.refresh()
            by_url = {w.url: w for w in pool.workers()}
            return by_url[D1].healthy, by_url[D2].healthy

    assert asyncio.run(main()) == (True, False)


# --- a worker 4xx is the client's error -------------------------------------------------------

REJECTION = {"error": {"message": "logit_bias token 99999 is outside the vocabulary",
                       "type": "invalid_request_error", "param": "logit_bias",
                       "code": "invalid_value"}}


def rejecting(_) -> httpx.Response:
    return httpx.Response(400, json=REJECTION)


def assert_unharmed(backend: DisaggregatedBackend) -> None:
    """Every worker still healthy, its breaker closed with no strike; nothing failed over."""
    for w in backend.pool.workers():
        assert w.healthy and w.breaker.state() == "closed" and w.breaker.consecutive == 0, w
    assert backend.failovers_total == 0


@pytest.mark.parametrize("stream", [False, True])
def test_worker_400_reaches_the_client_as_400_without_failover(served_model, stream):
    workers = Workers({D1: rejecting, D2: rejecting})
    # Slow probes: a probe must not put back a worker the dispatcher took out.
    settings = dispatch_settings(health_interval_s=60)
    backend = DisaggregatedBackend(settings, transport=httpx.MockTransport(workers.handler))
    app = create_app(settings, backend, models=[served_model])
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                 "max_tokens": 2, "stream": stream})
        assert_unharmed(backend)
    assert r.status_code == 400, r.text
    assert r.json() == REJECTION
    assert len(workers.paths("/generate")) == 1  # no second worker was asked


def test_prefill_worker_400_ends_the_request_before_any_decode():
    workers = Workers({D1: rejecting, D2: rejecting}, prefill={P: rejecting})
    req = GenerateRequest("r", "m", list(range(10, 30)), SamplingParams(max_tokens=2, seed=1))

    async def go(backend):
        with pytest.raises(BackendRejected, match="outside the vocabulary") as err:
            await tokens(backend, req)
        assert (err.value.param, err.value.code) == ("logit_bias", "invalid_value")
        assert_unharmed(backend)

    run(workers, go, prefill=True, health_interval_s=60)
    assert workers.paths("/prefill") == [P] and workers.paths("/generate") == []


@pytest.mark.parametrize("status", [404, 413, 422])
def test_any_rejection_status_carries_the_workers_text(status):
    detail = {"detail": [{"loc": ["body", "params"], "msg": "field required"}]}  # not OpenAI's
    workers = Workers({D1: lambda _: httpx.Response(status, json=detail), D2: rejecting})

    async def go(backend):
        with pytest.raises(BackendRejected, match="field required") as err:
            await tokens(backend)
        assert err.value.param is None
        assert_unharmed(backend)

    run(workers, go, health_interval_s=60)
    assert workers.paths("/generate") == [D1]


def test_worker_401_is_a_failure_and_logged_as_a_token_mismatch(caplog):
    """A wrong internal token is the router's misconfiguration: fail over, and say why."""
    workers = Workers({D1: lambda _: httpx.Response(401, json={"detail": "bad internal token"}),
                       D2: lambda _: httpx.Response(200, content=ndjson([7], 1))})

    async def go(backend):
        got = await tokens(backend)
        d1 = next(w for w in backend.pool.workers() if w.url == D1)
        return got, d1.healthy, backend.failovers_total

    assert run(workers, go, health_interval_s=60) == ([7], False, 1)
    assert any("internal token" in r.message and r.levelname == "ERROR" for r in caplog.records)
