"""The prefill hop against scripted workers: when it is taken, the streamed reply (first token,
then the commit line), and a prefill worker dying between the two."""

from __future__ import annotations

import asyncio
import json

import httpx

from engine.sampling_params import SamplingParams
from router.dispatch.backend import GenerateRequest
from tests.router.test_dispatch_faults import D1, D2, P, Workers, ndjson, run

PROMPT = list(range(10, 30))  # 20 tokens: 5 blocks of 4


def prefill_reply(first: int, commit: bool = True, tail_key: str | None = "tail:r"):
    """A /prefill body: the head line, then (unless the worker died) the commit line."""
    async def body():
        head = {"event": {"token_id": first, "num_cached_tokens": 0}, "tail_key": tail_key,
                "tail_start": 16}
        yield (json.dumps(head) + "\n").encode()
        if commit:
            yield b'{"committed": true, "stored_bytes": 1024}\n'
        else:
            raise httpx.RemoteProtocolError("peer closed connection")
    return body()


async def events(backend, req: GenerateRequest) -> list:
    return [ev async for ev in backend.generate(req)]


def request(max_tokens: int = 3, salt: str = "") -> GenerateRequest:
    return GenerateRequest("r", "m", list(PROMPT), SamplingParams(max_tokens=max_tokens, seed=1),
                           cache_salt=salt)


def test_first_token_comes_from_prefill_and_decode_gets_the_committed_tail():
    def decode(body):
        assert body["token_ids"] == PROMPT + [7]  # the prefill worker's token travels on
        assert body["tail_key"] == "tail:r" and body["tail_start"] == 16
        return httpx.Response(200, content=ndjson([8, 9], 2))

    workers = Workers({D1: decode, D2: decode},
                      prefill={P: lambda _: httpx.Response(200, content=prefill_reply(7))})
    got = run(workers, lambda b: events(b, request()), prefill=True)
    assert [e.token_id for e in got] == [7, 8, 9]
    assert got[0].num_cached_tokens == 0 and got[1].num_cached_tokens is None


def test_prefill_dying_after_its_first_token_costs_decode_a_recompute_only():
    def decode(body):
        assert body["token_ids"] == PROMPT + [7]
        assert body["tail_key"] is None  # nothing promised: load what landed, compute the rest
        return httpx.Response(200, content=ndjson([8, 9], 2))

    workers = Workers({D1: decode, D2: decode}, prefill={
        P: lambda _: httpx.Response(200, content=prefill_reply(7, commit=False))})
    got = run(workers, lambda b: events(b, request()), prefill=True)
    assert [e.token_id for e in got] == [7, 8, 9]


def test_short_uncached_part_is_prefilled_by_the_decode_worker():
    decode = lambda _: httpx.Response(200, content=ndjson([8], 1))  # noqa: E731
    workers = Workers({D1: decode, D2: decode},
                      prefill={P: lambda _: httpx.Response(200, content=prefill_reply(7))})
    got = run(workers, lambda b: events(b, request(1)), prefill=True, local_prefill_tokens=20)
    assert [e.token_id for e in got] == [8]
    assert workers.paths("/prefill") == []  # 19 uncached tokens < 20: no hop
    got = run(workers, lambda b: events(b, request(1)), prefill=True, local_prefill_tokens=19)
    assert workers.paths("/prefill") == [P]  # 19 >= 19: worth a hop


def test_no_prefix_cache_salts_each_request_apart():
    def decode(body):
        assert body["cache_salt"] == "tenant/r"  # the tenant's salt, then the request id
        return httpx.Response(200, content=ndjson([8], 1))

    workers = Workers({D1: decode, D2: decode})
    got = run(workers, lambda b: events(b, request(1, salt="tenant")))  # prefix_cache=False
    assert [e.token_id for e in got] == [8]


def test_first_token_reaches_the_client_before_the_kv_is_stored():
    gate = asyncio.Event()  # the prefill worker's store write, held until the client has token 1

    async def slow_commit():
        async for line in prefill_reply(7):
            if b"committed" in line:
                await gate.wait()
            yield line

    workers = Workers({D1: lambda _: httpx.Response(200, content=ndjson([8], 1)),
                       D2: lambda _: httpx.Response(200, content=ndjson([8], 1))},
                      prefill={P: lambda _: httpx.Response(200, content=slow_commit())})

    async def go(backend):
        stream = backend.generate(request(2))
        first = await asyncio.wait_for(anext(stream), 10)  # a router waiting on the commit hangs
        assert workers.paths("/generate") == []  # decode has not been asked to load anything yet
        gate.set()
        return [first.token_id] + [ev.token_id async for ev in stream]

    assert run(workers, go, prefill=True) == [7, 8]
