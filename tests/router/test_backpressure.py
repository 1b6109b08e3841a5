"""Backpressure at the router: the in-flight bound (429 before any backend call), a full
connection pool is a refusal rather than a worker failure, probes on their own client, a
prefill whose client left is closed, and a reader that stops reading is cut off."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from engine.sampling_params import SamplingParams
from router.dispatch.backend import BackendOverloaded, GenerateRequest, InflightGate
from router.output.streaming import SSEResponse
from tests.router.helpers import assert_envelope, cmpl
from tests.router.test_dispatch_faults import D1, D2, P, Workers, ndjson, run, tokens

# --- the in-flight bound ----------------------------------------------------------------------


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_the_bound_is_429_before_any_backend_call(make_app, fake, stream):
    fake.delay_s = 0.05  # ~25 events: the first request stays open about a second
    app = make_app(fake, max_inflight_choices=4)
    with TestClient(app, raise_server_exceptions=False) as client, \
            ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/completions", json=cmpl(n=3, stream=stream))
        wait_until(lambda: len(fake.active) == 3)
        r = client.post("/v1/completions", json=cmpl(n=2, stream=stream))
        assert_envelope(r, 429)
        assert r.headers["Retry-After"] == "1"
        assert len(fake.requests) == 3  # all of its choices or none: none ran
        one = client.post("/v1/completions", json=cmpl(n=1, max_tokens=2))  # still fits
        assert one.status_code == 200, one.text
        assert first.result().status_code == 200
        again = client.post("/v1/completions", json=cmpl(n=2, stream=stream))
        assert again.status_code == 200, again.text  # the first request's units came back
        assert app.state.tandem.inflight.open == 0


def test_a_request_larger_than_the_bound_is_a_400(make_app, fake):
    with TestClient(make_app(fake, max_inflight_choices=2), raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json=cmpl(n=3))
    assert_envelope(r, 400, param="n", code="integer_above_max_value")
    assert fake.requests == []


def test_units_come_back_when_choices_fail_or_the_client_leaves(make_app, fake):
    fake.fail_after = 1
    app = make_app(fake, max_inflight_choices=4)
    with TestClient(app, raise_server_exceptions=False) as client:
        for stream in (False, True):
            client.post("/v1/completions", json=cmpl(n=4, stream=stream))
            assert app.state.tandem.inflight.open == 0


def test_gate_admission_is_all_or_nothing():
    gate = InflightGate(limit=3)
    a = gate.admit(2)
    with pytest.raises(BackendOverloaded):
        gate.admit(2)
    assert gate.open == 2
    a.release()
    a.release_all()
    a.release_all()  # idempotent: never gives back more than it took
    assert gate.open == 0


# --- the connection pool to the workers -------------------------------------------------------


def test_a_full_connection_pool_is_a_refusal_not_a_worker_failure():
    def d1(_):
        raise httpx.PoolTimeout("no connection free")

    workers = Workers({D1: d1, D2: lambda _: httpx.Response(200, content=ndjson([7], 1))})

    async def go(backend):
        got = await tokens(backend)
        d1 = next(w for w in backend.pool.workers() if w.url == D1)
        return got, d1.healthy, d1.breaker.consecutive, backend.failovers_total

    assert run(workers, go, health_interval_s=60) == ([7], True, 0, 0)


def test_every_call_finding_the_pool_full_is_429():
    def full(_):
        raise httpx.PoolTimeout("no connection free")

    workers = Workers({D1: full, D2: full})

    async def go(backend):
        with pytest.raises(BackendOverloaded):
            await tokens(backend)
        return [(w.healthy, w.breaker.consecutive) for w in backend.pool.workers()]

    assert run(workers, go, health_interval_s=60) == [(True, 0), (True, 0)]


def test_probes_have_their_own_client_closed_with_the_pool():
    async def go(backend):
        probes = backend.pool._client
        assert probes is not backend.client
        await backend.pool.close()
        return probes.is_closed

    assert run(Workers({}), go, health_interval_s=60)


# --- a prefill whose client left --------------------------------------------------------------

LONG = list(range(10, 30))  # 5 blocks of 4: worth a prefill hop


class PrefillBody(httpx.AsyncByteStream):
    """A /prefill reply that sends `lines` and then computes forever; records its close."""

    def __init__(self, lines: list[bytes]):
        self.lines = lines
        self.closed = threading.Event()
        self.started = asyncio.Event()

    async def __aiter__(self):
        for line in self.lines:
            yield line
        self.started.set()
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed.set()


HEAD = b'{"event": {"token_id": 5}, "tail_key": null, "tail_start": 20}\n'


@pytest.mark.parametrize("lines", [[], [HEAD]], ids=["before-first-token", "before-commit"])
def test_closing_the_request_closes_the_prefill_stream(lines):
    body = PrefillBody(lines)
    decode = lambda _: httpx.Response(200, content=ndjson([9], 1))  # noqa: E731
    workers = Workers({D1: decode, D2: decode},
                      prefill={P: lambda _: httpx.Response(200, stream=body)})
    req = GenerateRequest("r", "m", LONG, SamplingParams(max_tokens=2, seed=1))

    async def go(backend):
        gen = backend.generate(req)
        if lines:  # the client has token 1 and leaves while the KV is being stored
            assert (await anext(gen)).token_id == 5
            await gen.aclose()
        else:  # the client leaves while the prompt computes: its task is cancelled
            task = asyncio.ensure_future(anext(gen))
            await asyncio.wait_for(body.started.wait(), 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return [w.inflight for w in backend.pool.workers()]

    assert run(workers, go, prefill=True, health_interval_s=60) == [0, 0, 0]
    assert body.closed.is_set()
    assert workers.paths("/generate") == []


# --- a reader that stops reading --------------------------------------------------------------


def test_a_client_that_stops_reading_is_cut_after_the_send_deadline():
    closed, released, sent = [], [], []

    async def chunks():
        try:
            while True:
                yield b"data: {}\n\n"
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    async def send(message):
        sent.append(message)
        if len(sent) > 2:  # the headers and one chunk, then the socket buffer is full
            await asyncio.Event().wait()

    async def receive():
        await asyncio.Event().wait()  # the client neither reads nor hangs up

    response = SSEResponse(chunks(), on_close=lambda: released.append(True),
                           send_timeout_s=0.2)
    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST"}

    async def main() -> float:
        start = time.monotonic()
        await asyncio.wait_for(response(scope, receive, send), 5)
        return time.monotonic() - start

    assert asyncio.run(main()) < 2
    assert closed == [True] and released == [True]
    assert len(sent) == 3
