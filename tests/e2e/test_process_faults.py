"""Faults injected into a real `tandem serve` process tree by signalling its processes: a prefill
worker killed mid-prefill, the router killed under load, Redis frozen (SIGSTOP) under load, and a
full disk under the disk tier. In every case no client may receive a wrong token.

One stack serves the first three tests: 2 prefill + 1 decode workers, its own Redis (a tier and
membership), and the memory tier sized to hold nothing, so blocks travel through disk and Redis.
The disk-full test has a stack of its own whose disk tier lives on a small tmpfs. References are
greedy runs of the same request on the same stack before the fault, compared as text; every
request gets a fresh cache salt, so a cache hit never hides a fault.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.faults import (
    complete,
    health,
    log_lines,
    metric,
    poll,
    redis_block_count,
    run_wave,
    salt,
    stream_completion,
    stream_partial,
)
from tests.e2e.stack import Stack
from tests.tmpfs import fill, free_bytes, tmpfs

STORY = (  # 108 tokens
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker named Elias. Every morning he opened his shop, wound the clocks on the walls, "
    "and listened to them tick together. One winter day a stranger in a grey coat walked in, "
    "carrying a broken pocket watch that had belonged to the king. The stranger said that the "
    "watch must be repaired before midnight, because the whole kingdom would fall silent if "
    "it stopped. Elias looked at the watch for a long time, and then he said")
# 467 tokens: a prefill of 1-2 s on this 2-vCPU box, a wide window to kill it in.
LONG = "\n\n".join(f"Chapter {i}. {STORY}." for i in range(1, 5)) + "\n\nThe end of chapter 5:"
COUNT = "Count from 1 to 300, separated by commas: " + ", ".join(map(str, range(1, 26))) + ","
STREAMS = 8  # concurrent streams in the load tests
WAVE_BOUND_S = 90.0  # a wave of STREAMS short requests: 5-40 s here; a hung call waits 120 s+
RESTART_BOUND_S = 120.0  # a worker reloading the model under load: 15-25 s, more on a busy box
MEMORY_OFF = ("--memory-cache-bytes", "1")  # no block fits: every read goes to disk, then Redis


def text_of(reply: httpx.Response) -> str:
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def salted(body: dict) -> dict:
    return {**body, "cache_salt": salt()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis):
    s = Stack(tmp_path_factory.mktemp("procfaults"), "--prefill-workers", "2",
              "--decode-workers", "1", "--redis-url", redis.url, *MEMORY_OFF)
    try:
        yield s.start()
    finally:
        s.stop()  # also when start() failed: no worker outlives the module


def urls_of(stack: Stack, role: str | None = None) -> list[str]:
    return [w["url"] for w in stack.workers() if role in (None, w["role"])]


def pid_at(url: str) -> int | None:
    """The pid answering at url, None while nothing does."""
    try:
        return health(url)["pid"]
    except httpx.HTTPError:
        return None


# --- prefill worker SIGKILL mid-prefill -------------------------------------------------------


def prefilling(urls: list[str]) -> tuple[str, int] | None:
    """(url, pid) of a prefill worker whose engine is computing a prompt right now."""
    for url in urls:
        h = health(url)
        if h["running"] > 0:
            return url, h["pid"]
    return None


def test_prefill_killed_mid_prefill_fails_over(stack):
    stack.wait_all_healthy()
    body = {"prompt": LONG, "max_tokens": 16, "temperature": 0}
    want = text_of(complete(stack, salted(body)))
    prefill = urls_of(stack, "prefill")
    failovers = metric(stack.url, "tandem:worker_failovers_total")
    with ThreadPoolExecutor(3) as pool:
        replies = [pool.submit(complete, stack, salted(body)) for _ in range(3)]
        url, pid = poll(lambda: prefilling(prefill), 60, "a prefill to be running", every=0.02)
        os.kill(pid, signal.SIGKILL)
        texts = [text_of(r.result(timeout=180)) for r in replies]
    assert texts == [want] * 3
    # the kill broke a /prefill call and the router retried it elsewhere
    assert metric(stack.url, "tandem:worker_failovers_total") >= failovers + 1
    poll(lambda: pid_at(url) not in (None, pid), RESTART_BOUND_S,
         "the supervisor to restart the prefill worker", every=0.5)
    stack.wait_all_healthy()
    assert text_of(complete(stack, salted(body))) == want  # and the restarted stack serves


# --- router SIGKILL under load ----------------------------------------------------------------


def cut_wave(stack: Stack, body: dict, fault: Callable[[], None]) -> list[tuple[bool, str]]:
    """STREAMS concurrent streams; `fault()` runs once each has its first token. Returns per
    stream (whether it finished, the text the client received)."""
    got: list[list[str]] = [[] for _ in range(STREAMS)]
    started, lock, count = threading.Event(), threading.Lock(), [0]

    def on_chunk(n: int) -> None:
        with lock:
            count[0] += n == 1
            if count[0] == STREAMS:
                started.set()

    with ThreadPoolExecutor(STREAMS) as pool:
        done = [pool.submit(stream_partial, stack, salted(body), got[i], on_chunk)
                for i in range(STREAMS)]
        assert started.wait(120), "the streams never all started"
        fault()
        finished = [f.result(timeout=WAVE_BOUND_S) for f in done]
    return list(zip(finished, ["".join(parts) for parts in got], strict=True))


def idle(url: str) -> bool:
    h = health(url)
    return h["running"] == 0 and h["waiting"] == 0


def test_router_killed_under_load_restarts_clean(stack):
    stack.wait_all_healthy()
    body = {"prompt": COUNT, "max_tokens": 128, "temperature": 0, "ignore_eos": True}
    want = stream_completion(stack, salted(body))
    # Streams that would run for minutes: within the poll bound below, only aborting them on
    # the router's death frees their slots. Greedy text only grows with max_tokens, so what the
    # clients get before the kill (a few dozen tokens) must be a prefix of `want`.
    endless = {**body, "max_tokens": 2000}
    [router] = stack.child_pids("router")
    workers = urls_of(stack)
    decode = urls_of(stack, "decode")

    def kill_router() -> None:
        assert sum(health(u)["running"] for u in decode) > 0, "no stream on the workers"
        os.kill(router, signal.SIGKILL)

    streams = cut_wave(stack, endless, kill_router)
    assert not any(done for done, _ in streams), "a stream outlived the router"
    for _, text in streams:
        assert text and want.startswith(text), (text, want)  # cut short, never wrong
    # each worker noticed its caller was gone and freed the sequence's slot
    poll(lambda: all(idle(u) for u in workers), 30, "the workers to free every slot")
    poll(lambda: [p for p in stack.child_pids("router") if p != router], 60,
         "the supervisor to restart the router")
    stack.wait_ready()
    stack.wait_all_healthy()
    assert run_wave(stack, body, STREAMS) == [want] * STREAMS


# --- Redis SIGSTOP under load -----------------------------------------------------------------


def bounded_wave(stack: Stack, body: dict, started: threading.Event | None = None) -> list[str]:
    """run_wave, failing if it takes longer than WAVE_BOUND_S: a call stuck on a frozen
    Redis would hold it past that."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run_wave, stack, body, STREAMS, started).result(WAVE_BOUND_S)


def redis_up(url: str) -> bool:
    return metric(url, "tandem:kvstore_tier_up", tier="redis") == 1.0


def test_redis_frozen_under_load(stack, redis):
    stack.wait_all_healthy()
    # 108 prompt + 24 generated tokens: prefill stores block 0 and the tail, decode block 1
    body = {"prompt": STORY, "max_tokens": 24, "temperature": 0}
    want = stream_completion(stack, salted(body))
    prefill, decode = urls_of(stack, "prefill"), urls_of(stack, "decode")
    assert all(redis_up(u) for u in prefill + decode)
    started = threading.Event()
    freezer = threading.Thread(target=lambda: started.wait(120) and redis.pause())
    freezer.start()
    try:
        assert bounded_wave(stack, body, started) == [want] * STREAMS  # frozen midway
        freezer.join()
        assert bounded_wave(stack, body) == [want] * STREAMS  # all of it frozen
        # the workers saw the hang (bounded timeouts) and took the tier down
        assert not any(redis_up(u) for u in decode), "the decode worker never noticed"
        assert not all(redis_up(u) for u in prefill), "no prefill worker noticed"
    finally:
        started.set()  # a wave that failed early must not leave the freezer to pause later
        freezer.join()
        redis.resume()
    blocks = redis_block_count(redis.client())

    def redis_used_again() -> bool:
        assert stream_completion(stack, salted(body)) == want
        return (redis_block_count(redis.client()) > blocks
                and all(redis_up(u) for u in decode) and any(redis_up(u) for u in prefill))

    # the breakers probe again after their backoff (doubling while frozen, up to 30 s)
    poll(redis_used_again, 90, "the Redis tier to be used again", every=0.5)


# --- disk full --------------------------------------------------------------------------------

# An fp32 SmolLM2 block is 2.9 MB: 64 MiB holds the references' blocks, then is filled up.
TMPFS_BYTES = 64 << 20
BLOCK_BYTES = 30 * 2 * 3 * 64 * 64 * 4  # [L, 2, H, B, D] fp32, payload only


@pytest.fixture(scope="module")
def tiny_disk(tmp_path_factory):
    """A tmpfs of TMPFS_BYTES (needs root, as this box and CI run). No mount, no test: fail."""
    mnt = tmp_path_factory.mktemp("tmpfs")
    with tmpfs(mnt, str(TMPFS_BYTES)):
        yield mnt


@pytest.fixture(scope="module")
def disk_stack(tmp_path_factory, tiny_disk):
    """1 prefill + 1 decode, no Redis: the disk is the only tier that outlives a request. The
    log stays off the tmpfs (it must not hit ENOSPC); a stack that fails to start is stopped
    too, so nothing holds the mount."""
    s = Stack(tmp_path_factory.mktemp("diskfull"), "--disk-cache-dir", str(tiny_disk / "kv"),
              *MEMORY_OFF)
    try:
        yield s.start()
    finally:
        s.stop()


def disk_state(stack: Stack, prefill: str, decode: str, kv: Path) -> dict:
    """What the disk tier did, as the workers expose it: bytes stored by the prefill worker,
    blocks the decode worker read back, ENOSPC events and breaker trips (logged), files."""
    return {
        "stored": metric(prefill, "tandem:kvstore_bytes_total", tier="disk", op="put"),
        "hits": metric(decode, "tandem:kvstore_hits_total", tier="disk"),
        "full": log_lines(stack, "is full"),  # kvstore/disk.py _put_one: evicted, retrying
        "down": log_lines(stack, "tier disk is down"),  # kvstore/breaker.py
        "files": {p.name for p in kv.glob("*.kv")},
    }


def test_disk_full_evicts_and_keeps_serving(disk_stack, tiny_disk):
    disk_stack.wait_all_healthy()
    kv, junk = tiny_disk / "kv", tiny_disk / "junk"
    [prefill], [decode] = urls_of(disk_stack, "prefill"), urls_of(disk_stack, "decode")
    # distinct prompts of 1 block + a tail; 24 tokens take decode into block 1
    bodies = [{"prompt": f"Tale {i}. {STORY}", "max_tokens": 24, "temperature": 0}
              for i in range(4)]
    wants = [text_of(complete(disk_stack, salted(b))) for b in bodies]  # disk not yet full
    try:
        fill(junk)
        assert free_bytes(tiny_disk) < 1 << 20
        before = disk_state(disk_stack, prefill, decode, kv)
        started = time.monotonic()
        for body, want in zip(bodies, wants, strict=True):
            assert text_of(complete(disk_stack, salted(body))) == want  # 200 and exact
        assert time.monotonic() - started < WAVE_BOUND_S
        after = disk_state(disk_stack, prefill, decode, kv)
        assert junk.stat().st_size > 0  # the tier evicts its own files only
    finally:
        junk.unlink(missing_ok=True)
    assert after["full"] > before["full"], "the writes never hit ENOSPC"
    assert after["down"] == before["down"], disk_stack.log_tail()  # evicted, never tripped
    assert all(metric(u, "tandem:kvstore_tier_up", tier="disk") == 1.0 for u in (prefill, decode))
    assert before["files"] - after["files"], "nothing was evicted"
    # every prompt's block went into the full disk, and the decode worker read it back
    assert after["stored"] >= before["stored"] + len(bodies) * BLOCK_BYTES
    assert after["hits"] >= before["hits"] + len(bodies)
