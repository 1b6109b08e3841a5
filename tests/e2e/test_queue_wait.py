"""A request that waits on a worker longer than the router's worker timeout (queued behind
another, or a long prompt being computed) is served, not taken for a worker failure: the
worker's reply stream sends keepalive lines meanwhile (wire/streaming.py, with_keepalive).
Without them the router's read timed out and struck the healthy worker: a queued decode failed
over to nothing (a CI run's 503: "no decode worker recovered in 45 s"), and a long prefill was
recomputed by the decode worker."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.e2e.faults import complete, counters, metric, stream_completion
from tests.e2e.stack import Stack

WORKER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # 1 prefill + 1 decode worker, each with one slot and one queue place: a second request
    # waits for the whole first one.
    with Stack(tmp_path_factory.mktemp("queue_wait"), "--max-slots", "1",
               "--max-queue", "1", "--worker-timeout-s", str(WORKER_TIMEOUT_S),
               "--stream-keepalive-s", "0.2") as s:
        yield s


def test_a_request_queued_past_the_worker_timeout_is_served(stack):
    short = {"prompt": "Say hello.", "max_tokens": 8, "temperature": 0}
    want = complete(stack, short).json()["choices"][0]["text"]
    failovers = metric(stack.url, "tandem:worker_failovers_total")
    queued: dict = {}

    def send_short() -> None:
        queued["sent"] = time.monotonic()
        queued["reply"] = complete(stack, short)

    waiter = threading.Thread(target=send_short)

    def on_chunk(n: int) -> None:
        if n == 1:  # the long request holds the only slot now
            waiter.start()

    long = {"prompt": "Tell me a long story.", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}
    stream_completion(stack, long, on_chunk)
    long_done = time.monotonic()
    waiter.join(timeout=120)
    assert not waiter.is_alive(), "the queued request never finished"
    assert long_done - queued["sent"] > 2 * WORKER_TIMEOUT_S, (
        "the long request ended too soon to keep the other queued past the worker timeout")
    r: httpx.Response = queued["reply"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want
    assert metric(stack.url, "tandem:worker_failovers_total") == failovers
    assert all(w["healthy"] for w in stack.workers())


def test_a_prefill_computing_past_the_worker_timeout_is_not_a_failure(stack):
    [prefill] = [w for w in stack.workers() if w["role"] == "prefill"]
    before = counters(prefill["url"])["requests_total"]
    failovers = metric(stack.url, "tandem:worker_failovers_total")
    prompt = [(7 * i) % 40000 + 100 for i in range(6000)]  # token ids: seconds of prefill on CPU
    start = time.monotonic()
    r = complete(stack, {"prompt": prompt, "max_tokens": 4, "temperature": 0,
                         "ignore_eos": True})
    took = time.monotonic() - start
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    assert took > 2 * WORKER_TIMEOUT_S, f"the prefill took {took:.1f} s: too fast to test"
    assert counters(prefill["url"])["requests_total"] == before + 1  # it computed the prompt
    assert metric(stack.url, "tandem:worker_failovers_total") == failovers
