"""n > 1 against scripted workers (router/dispatch/group.py): the choices of one prompt go out
as one call with forks, and come back as one iterator each; faults split them up."""

from __future__ import annotations

import asyncio
import json

import httpx

from engine.sampling_params import SamplingParams
from router.dispatch.backend import GenerateRequest
from tests.router.test_dispatch_faults import D1, D2, P, Workers, run

PROMPT = list(range(10, 30))  # 20 tokens: 5 blocks of 4


def group(n: int = 3, max_tokens: int = 3) -> list[GenerateRequest]:
    return [GenerateRequest(f"c-{j}", "m", list(PROMPT),
                            SamplingParams(max_tokens=max_tokens, seed=100 + j))
            for j in range(n)]


def lines(events: list[tuple[str, int, bool]], cut: bool = False):
    """A /generate body of several sequences: (seq_id, token, finishes) per line."""
    async def body():
        for seq_id, token, finish in events:
            line = {"seq_id": seq_id, "token_id": token}
            if finish:
                line["finish_reason"] = "length"
            yield (json.dumps(line) + "\n").encode()
        if cut:
            raise httpx.RemoteProtocolError("peer closed connection")
    return body()


async def read_all(backend, reqs) -> list[list[int]]:
    async def one(it):
        return [ev.token_id async for ev in it]
    return list(await asyncio.gather(*(one(it) for it in backend.generate_group(reqs))))


INTERLEAVED = [("c-0", 1, False), ("c-1", 11, False), ("c-2", 21, False),
               ("c-0", 2, False), ("c-1", 12, True), ("c-2", 22, False),
               ("c-0", 3, True), ("c-2", 23, True)]


def test_choices_go_out_as_one_call_with_forks():
    def decode(body):
        assert body["request_id"] == "c-0" and body["token_ids"] == PROMPT
        assert [(f["request_id"], f["params"]["seed"]) for f in body["forks"]] == [
            ("c-1", 101), ("c-2", 102)]
        return httpx.Response(200, content=lines(INTERLEAVED))

    workers = Workers({D1: decode, D2: decode})
    got = run(workers, lambda b: read_all(b, group()), local_prefill_tokens=100)
    assert got == [[1, 2, 3], [11, 12], [21, 22, 23]]
    assert len(workers.paths("/generate")) == 1


def test_a_broken_shared_stream_resumes_each_unfinished_choice_alone():
    def d1(body):
        return httpx.Response(200, content=lines(INTERLEAVED[:5], cut=True))

    resumed = {}

    def d2(body):
        assert "forks" not in body or not body["forks"]
        resumed[body["request_id"]] = body["token_ids"][len(PROMPT):]
        done = {"c-0": [("c-0", 3, True)], "c-2": [("c-2", 22, False), ("c-2", 23, True)]}
        return httpx.Response(200, content=lines(done[body["request_id"]]))

    workers = Workers({D1: d1, D2: d2})
    got = run(workers, lambda b: read_all(b, group()), local_prefill_tokens=100)
    assert got == [[1, 2, 3], [11, 12], [21, 22, 23]]  # nothing lost, nothing repeated
    # c-1 had finished; the others go on from their own tokens, each on the other worker.
    assert resumed == {"c-0": [1, 2], "c-2": [21]}


def test_a_choice_closed_early_is_aborted_and_the_others_go_on():
    gate = asyncio.Event()

    def decode(body):
        async def body_lines():
            async for line in lines(INTERLEAVED[:3]):
                yield line
            await gate.wait()  # the router closes c-1 meanwhile
            async for line in lines([e for e in INTERLEAVED[3:] if e[0] != "c-1"]):
                yield line
        return httpx.Response(200, content=body_lines())

    workers = Workers({D1: decode, D2: decode})

    async def go(backend):
        its = backend.generate_group(group())
        first_of = [await anext(it) for it in its]
        await its[1].aclose()  # e.g. a stop string: the router wants no more of c-1
        while not workers.paths("/abort"):
            await asyncio.sleep(0.01)
        gate.set()
        rest = [[ev.token_id async for ev in its[0]], [ev.token_id async for ev in its[2]]]
        return [ev.token_id for ev in first_of], rest

    firsts, rest = run(workers, go, local_prefill_tokens=100)
    assert firsts == [1, 11, 21] and rest == [[2, 3], [22, 23]]
    [(_, _, abort)] = [c for c in workers.calls if c[1] == "/abort"]
    assert abort == {"request_id": "c-1"}


def prefill_reply(forks: list[int]):
    async def body():
        head = {"event": {"token_id": 7, "num_cached_tokens": 0}, "tail_key": "tail:c-0",
                "tail_start": 16, "forks": [{"token_id": t, "seq_id": f"c-{j + 1}"}
                                            for j, t in enumerate(forks)]}
        yield (json.dumps(head) + "\n").encode()
        yield b'{"committed": true, "stored_bytes": 1024}\n'
    return body()


def test_one_prefill_then_a_decode_call_per_choice_loading_the_parents_tail():
    def prefill(body):
        assert [f["request_id"] for f in body["forks"]] == ["c-1", "c-2"]
        return httpx.Response(200, content=prefill_reply([17, 27]))

    def decode(body):
        rid = body["request_id"]
        first = {"c-0": 7, "c-1": 17, "c-2": 27}[rid]
        assert body["token_ids"] == PROMPT + [first]
        assert (body["tail_key"], body["tail_owner"]) == ("tail:c-0", "c-0")
        return httpx.Response(200, content=lines([(rid, first + 1, False),
                                                  (rid, first + 2, True)]))

    workers = Workers({D1: decode, D2: decode}, prefill={P: prefill})
    got = run(workers, lambda b: read_all(b, group()), prefill=True)
    assert got == [[7, 8, 9], [17, 18, 19], [27, 28, 29]]
    assert workers.paths("/prefill") == [P] and len(workers.paths("/generate")) == 3


def test_a_prefill_reply_missing_fork_tokens_is_a_failed_prefill():
    def decode(body):
        assert len(body["forks"]) == 2  # the decode worker prefills the group instead
        return httpx.Response(200, content=lines(INTERLEAVED))

    workers = Workers({D1: decode, D2: decode},
                      prefill={P: lambda _: httpx.Response(200, content=prefill_reply([17]))})
    got = run(workers, lambda b: read_all(b, group()), prefill=True, max_failovers=0)
    assert got == [[1, 2, 3], [11, 12], [21, 22, 23]]
