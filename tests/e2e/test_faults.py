"""Fault injection against a real `tandem serve` process tree (docs/RELIABILITY.md).

One stack serves every test: 1 prefill + 2 decode workers, Redis as a shared tier and for
membership, the memory tier sized to hold nothing (so every block read goes to disk, then
Redis), and 2 slots + 2 queued requests per worker (so backpressure is cheap to reach). Tests
that kill a worker wait for the supervisor's restart before the next one needs it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from engine.sampling_params import SamplingParams
from kvstore import KeyNamespace, block_keys
from kvstore.redis_tier import kv_prefix
from tests.e2e.faults import (
    MODEL,
    complete,
    counters,
    decode_urls,
    delta,
    flip_bytes,
    flip_redis_value,
    health,
    kv_files,
    kv_path,
    metric,
    poll,
    redis_block_count,
    run_wave,
    salt,
    start_decode_worker,
    stream_completion,
)
from tests.e2e.stack import Stack, free_port
from wire.internal_api import DecodeRequest, PrefillRequest, parse_event
from wire.membership import ad_key

# 105 tokens: the prompt fills block 0 and most of block 1, so ~20 generated tokens complete
# block 1, which only the decode worker can store.
COUNT = "Count from 1 to 300, separated by commas: " + ", ".join(map(str, range(1, 26))) + ","
# Greedy SmolLM2 continues the count exactly for 120 tokens (checked against HF generate, which
# takes a minute on a loaded 2-vCPU box); a lost or repeated token skips or repeats a number.
COUNT_GREEDY = "".join(f" {i}," for i in range(26, 56))
STORY = (  # 108 tokens, open-ended: sampled continuations differ by seed
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker named Elias. Every morning he opened his shop, wound the clocks on the walls, "
    "and listened to them tick together. One winter day a stranger in a grey coat walked in, "
    "carrying a broken pocket watch that had belonged to the king. The stranger said that the "
    "watch must be repaired before midnight, because the whole kingdom would fall silent if "
    "it stopped. Elias looked at the watch for a long time, and then he said")
LONG_TOKENS = 120  # generated per kill test
KILL_AFTER = 20  # tokens the client has seen when the worker dies
# The kill choreography below is laid out in 64-token blocks (the prompts fill block 0 and
# most of block 1), so this stack runs them rather than the default 16: what a fault costs
# does not depend on the block size, only where its boundaries fall.
BLOCK = 64
CAPACITY = 2 * (2 + 2)  # decode workers x (max_slots + max_queue)
WORKER_FLAGS = ("--memory-cache-bytes", "1", "--max-slots", "2", "--max-queue", "2",
                "--block-size", str(BLOCK))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis):
    with Stack(tmp_path_factory.mktemp("faults"), "--decode-workers", "2",
               "--redis-url", redis.url, *WORKER_FLAGS) as s:
        yield s


def kill_mid_stream(stack: Stack, body: dict) -> tuple[str, dict]:
    """Stream `body`; once the client has KILL_AFTER tokens and the serving decode worker has
    stored a block of generated tokens, SIGKILL that worker. Returns (text, the surviving
    decode worker's counter deltas)."""
    stack.wait_all_healthy()
    kv_dir = stack.workdir / "kv"
    files_before = kv_files(kv_dir)
    before = {url: counters(url) for url in decode_urls(stack)}
    failovers = metric(stack.url, "tandem:worker_failovers_total")
    killed: list[dict] = []

    def on_chunk(n: int) -> None:
        if killed or n < KILL_AFTER:
            return
        # prefill stored block 0 + the prompt's tail; the third file is block 1, written by
        # the decode worker once its KV covered tokens [64, 128)
        poll(lambda: kv_files(kv_dir) >= files_before + 3, 60, "a generated block on disk")
        [serving] = [w for w in stack.workers() if w["role"] == "decode" and w["inflight"]]
        os.kill(serving["pid"], signal.SIGKILL)
        killed.append(serving)

    text = stream_completion(stack, body, on_chunk)
    assert killed, "the stream ended before the kill"
    [survivor] = [url for url in before if url != killed[0]["url"]]
    assert metric(stack.url, "tandem:worker_failovers_total") >= failovers + 1
    return text, delta(counters(survivor), before[survivor])


def check_resume_counters(d: dict) -> None:
    """The survivor took one request, loaded the prompt block and the dead worker's block of
    generated tokens, and recomputed less than a block."""
    assert d["requests_total"] == 1, d
    assert d["prefix_tokens_loaded_total"] >= 2 * BLOCK, d
    assert 0 < d["admit_tokens_computed_total"] < BLOCK, d


def test_decode_killed_mid_stream_greedy_resumes_exactly(stack):
    text, survivor = kill_mid_stream(stack, {
        "prompt": COUNT, "max_tokens": LONG_TOKENS, "temperature": 0, "ignore_eos": True,
        "cache_salt": salt()})
    assert text == COUNT_GREEDY
    check_resume_counters(survivor)


# ~100 tokens of guided JSON after the COUNT prompt: the kill lands mid-array.
NUMBERS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
           "minItems": 50, "maxItems": 50}


def test_decode_killed_mid_stream_guided_json_resumes_exactly(stack):
    """The survivor rebuilds the grammar state from the tokens so far: the same valid JSON as
    a quiet run of the same request."""
    body = {"prompt": COUNT, "max_tokens": 200, "temperature": 0, "guided_json": NUMBERS}
    want = stream_completion(stack, {**body, "cache_salt": salt()})
    text, survivor = kill_mid_stream(stack, {**body, "cache_salt": salt()})
    assert text == want
    jsonschema.validate(json.loads(text), NUMBERS)
    check_resume_counters(survivor)


JSON = {"Content-Type": "application/json"}


def test_corrupt_block_between_prefill_and_decode_is_recomputed(stack, redis):
    """Injected after /prefill stored the prompt and before /generate reads it: 64 bytes XOR
    0xFF in the middle (the tensor payload) of block 1, in its disk file and its Redis value.
    Driven through the worker APIs, so nothing runs between the two calls but the injection."""
    # The test before it killed a decode worker: wait for the restart, so the URL picked
    # here is a live process (the router may list the dead one as healthy for a moment).
    workers = stack.wait_all_healthy()
    prefill = next(w["url"] for w in workers if w["role"] == "prefill")
    decode = next(w["url"] for w in workers if w["role"] == "decode")
    params = SamplingParams(max_tokens=16, temperature=0.0, seed=7)
    ids = httpx.post(f"{stack.url}/tokenize", timeout=30, json={
        "model": MODEL, "prompt": STORY + COUNT}).json()["tokens"]
    assert len(ids) > 3 * BLOCK

    def prefill_then_decode(inject) -> list[int]:
        rid, cache_salt = f"corrupt-{salt()}", salt()
        pre = httpx.post(f"{prefill}/prefill", timeout=120, content=PrefillRequest(
            request_id=rid, token_ids=ids, params=params, cache_salt=cache_salt
        ).model_dump_json(), headers=JSON)
        assert pre.status_code == 200, pre.text
        head, committed = [json.loads(line) for line in pre.text.splitlines()]
        assert committed["committed"] and committed["stored_bytes"] > 0
        pre = head
        inject(cache_salt)
        first = pre["event"]["token_id"]
        body = DecodeRequest(request_id=rid, token_ids=ids + [first], num_prompt_tokens=len(ids),
                             params=params, cache_salt=cache_salt, tail_key=pre["tail_key"],
                             tail_start=pre["tail_start"])
        with httpx.stream("POST", f"{decode}/generate", content=body.model_dump_json(),
                          headers=JSON, timeout=120) as r:
            assert r.status_code == 200
            return [first] + [parse_event(line).token_id
                              for line in r.iter_lines() if line]

    def corrupt_block_1(cache_salt: str) -> None:
        h = health(decode)
        key = block_keys(ids, KeyNamespace(h["fingerprint"], h["dtype"], h["block_size"],
                                           cache_salt))[1]
        flip_bytes(kv_path(stack.workdir / "kv", key))
        flip_redis_value(redis.client(), kv_prefix("default") + key)

    want = prefill_then_decode(lambda _: None)  # no fault, same workers
    corrupt = {t: metric(decode, "tandem:kvstore_corrupt_blocks_total", tier=t)
               for t in ("disk", "redis")}
    before = counters(decode)
    assert prefill_then_decode(corrupt_block_1) == want
    for tier, n in corrupt.items():
        assert metric(decode, "tandem:kvstore_corrupt_blocks_total", tier=tier) == n + 1, tier
    d = delta(counters(decode), before)
    assert d["prefix_tokens_loaded_total"] == BLOCK, d  # block 0 only: block 1 was refused
    assert d["admit_tokens_computed_total"] == len(ids) + 1 - BLOCK, d


def test_overload_answers_429_with_retry_after(stack):
    prompt = "Write a poem about the sea."  # under a block: no prefill hop, decode is the limit
    # Long enough answers that the burst outlives a slow router's dispatch: one CI run of 24
    # requests x 24 tokens never held more than the 8 places at once.
    body = {"prompt": prompt, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    want = complete(stack, body).json()["choices"][0]["text"]
    refused_before = sum(counters(u)["requests_refused_total"] for u in decode_urls(stack))
    with ThreadPoolExecutor(3 * CAPACITY) as pool:
        replies = list(pool.map(lambda _: complete(stack, body), range(3 * CAPACITY)))
    codes = sorted(r.status_code for r in replies)
    assert set(codes) <= {200, 429}, codes
    assert 200 in codes and 429 in codes, codes
    for r in replies:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["choices"][0]["text"] == want
    refused = sum(counters(u)["requests_refused_total"] for u in decode_urls(stack))
    assert refused > refused_before


def test_aborted_streams_leak_no_slots(stack):
    """100 streams dropped by the client at three points (right after the headers, after one
    chunk, mid-stream); afterwards no sequence is left and every admission slot is free."""
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 200,
            "ignore_eos": True, "stream": True}

    def abort(i: int) -> int:
        with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(i % 3 * 3):  # 0, 3 or 6 lines (data lines alternate with blanks)
                next(lines)
            return r.status_code

    stack.wait_all_healthy()
    # 4 clients: at most 8 requests held (4 live + 4 being torn down), the stack's capacity
    with ThreadPoolExecutor(CAPACITY // 2) as pool:
        assert set(pool.map(abort, range(100))) == {200}
    urls = decode_urls(stack)
    poll(lambda: all(health(u)["running"] == 0 and health(u)["waiting"] == 0 for u in urls),
         30, "aborted sequences to be freed")
    # Every admission ticket came back: CAPACITY concurrent requests are all admitted.
    short = {"prompt": "Say hello.", "max_tokens": 8, "temperature": 0}
    with ThreadPoolExecutor(CAPACITY) as pool:
        codes = [r.status_code for r in pool.map(lambda _: complete(stack, short),
                                                 range(CAPACITY))]
    assert codes == [200] * CAPACITY


def test_redis_outage_under_load(stack, redis):
    stack.wait_all_healthy()
    body = {"prompt": STORY, "max_tokens": 16, "temperature": 0}  # 108 tokens: prefill hop
    want = stream_completion(stack, body)
    started = threading.Event()
    stopper = threading.Thread(target=lambda: started.wait(120) and redis.stop())
    stopper.start()
    assert run_wave(stack, body, CAPACITY, started) == [want] * CAPACITY  # Redis stops midway
    stopper.join()
    assert not redis.running
    assert run_wave(stack, body, CAPACITY) == [want] * CAPACITY  # all of it without Redis

    redis.restart()  # empty: persistence is off
    prefill = next(w["url"] for w in stack.workers() if w["role"] == "prefill")

    def redis_used_again() -> bool:
        assert stream_completion(stack, {**body, "cache_salt": salt()}) == want
        return (redis_block_count(redis.client()) > 0
                and metric(prefill, "tandem:kvstore_tier_up", tier="redis") == 1.0)

    # the tier's breaker probes again after its backoff (doubling, up to 30 s)
    poll(redis_used_again, 90, "the Redis tier to be used again", every=0.5)


def test_discovered_worker_drains_on_sigterm(stack, redis):
    """A decode worker outside `tandem serve` joins through its Redis heartbeat; on SIGTERM it
    leaves membership, refuses new work, finishes its stream and exits."""
    stack.wait_all_healthy()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = start_decode_worker(stack, port, "--dtype", "float32", "--redis-url", redis.url,
                                "--disk-cache-dir", str(stack.workdir / "kv"),
                                # 120 fp32 tokens on 2 vCPUs shared by four workers: one
                                # stream took over 60 s on a busy Xeon box
                                "--drain-grace-s", "180", *WORKER_FLAGS)
    try:
        found = poll(lambda: [w for w in stack.workers() if w["url"] == url and w["healthy"]],
                     180, "the router to discover the new worker", every=0.5)
        assert found[0]["discovered"] and found[0]["role"] == "decode"
        # Long enough (no EOS) that the new worker's stream is still running when the last of
        # the wave's streams has its first token: the workers share 2 cores, so that can take
        # as long as a short reply does.
        body = {"prompt": "List some animals.", "max_tokens": LONG_TOKENS, "temperature": 0,
                "ignore_eos": True}
        want = complete(stack, body).json()["choices"][0]["text"]
        failovers = metric(stack.url, "tandem:worker_failovers_total")
        started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            wave = pool.submit(run_wave, stack, body, 3, started)  # one per decode worker
            assert started.wait(120), "the wave's streams never all started"
            [serving] = [w for w in stack.workers() if w["url"] == url]
            assert serving["inflight"] == 1, serving
            extra.send_signal(signal.SIGTERM)
            poll(lambda: redis.client().exists(ad_key("default", url)) == 0, 10,
                 "the worker to leave membership")
            # Not sent to it. It shares 2 cores with the wave's three streams and the draining
            # one: over 180 s once on a busy Xeon box (CI, 2026-12-07), hence the long limit.
            again = complete(stack, body, timeout_s=400)
            assert again.json()["choices"][0]["text"] == want
            assert wave.result() == [want] * 3
        assert extra.wait(timeout=200) is not None
        log = (stack.workdir / f"decode-{port}.log").read_text()
        assert "draining 1 request(s)" in log and "drained; shutting down" in log, log[-2000:]
        assert metric(stack.url, "tandem:worker_failovers_total") == failovers  # drained
        poll(lambda: url not in [w["url"] for w in stack.workers()], 15,
             "the router to drop the worker")
    finally:
        if extra.poll() is None:
            extra.kill()
            extra.wait()


def test_decode_killed_mid_stream_seeded_sampling_resumes_exactly(stack):
    body = {"prompt": STORY, "max_tokens": LONG_TOKENS, "temperature": 0.8, "seed": 1234,
            "ignore_eos": True}
    want = stream_completion(stack, {**body, "cache_salt": salt()})  # same stack, no fault
    text, survivor = kill_mid_stream(stack, {**body, "cache_salt": salt()})
    assert text == want
    check_resume_counters(survivor)


# Under a block (64 tokens): no prefill hop, so one decode call forks all the choices.
SHORT_STORY = "Once upon a time, in a small village at the edge of a great forest,"


def stream_choices(stack: Stack, body: dict, on_chunk) -> list[str]:
    """A streamed n > 1 completion: each choice's text; on_chunk(tokens per choice) after each
    chunk."""
    texts: dict[int, list[str]] = {}
    with httpx.stream("POST", f"{stack.url}/v1/completions", timeout=180,
                      json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                texts.setdefault(c["index"], []).append(c.get("text") or "")
            on_chunk([len(texts.get(i, [])) for i in range(body["n"])])
    return ["".join(texts[i]) for i in range(body["n"])]


def test_forked_choices_resume_each_alone_after_a_decode_kill(stack):
    """n=3 seeded choices share one decode call (forked off one prompt computation); the
    worker is killed mid-stream, and each choice resumes alone on the other worker with its own
    tokens so far: every text equals the same request's on a quiet stack."""
    stack.wait_all_healthy()
    body = {"prompt": SHORT_STORY, "max_tokens": 60, "temperature": 1.0, "seed": 7, "n": 3,
            "ignore_eos": True, "cache_salt": salt()}
    quiet = complete(stack, body)
    assert quiet.status_code == 200, quiet.text
    want = [c["text"] for c in sorted(quiet.json()["choices"], key=lambda c: c["index"])]
    assert len(set(want)) == 3  # seeded choices differ: a mix-up between them would show
    failovers = metric(stack.url, "tandem:worker_failovers_total")
    killed: list[dict] = []

    def on_chunk(counts: list[int]) -> None:
        if killed or min(counts) < KILL_AFTER:
            return
        [serving] = [w for w in stack.workers() if w["role"] == "decode" and w["inflight"]]
        os.kill(serving["pid"], signal.SIGKILL)
        killed.append(serving)

    got = stream_choices(stack, {**body, "cache_salt": salt()}, on_chunk)
    assert killed, "the stream ended before the kill"
    assert got == want
    assert metric(stack.url, "tandem:worker_failovers_total") >= failovers + 1
    stack.wait_all_healthy()
