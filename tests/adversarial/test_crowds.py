"""Crowds: 200 clients that stop reading at once, and a second stack on the package stack's
Redis under another cluster id. This file sorts before test_hostile_clients.py on purpose: that
file's last test checks that the canary was never hurt and every worker is healthy afterwards.
"""

from __future__ import annotations

import json
import logging
import selectors
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from kvstore import KeyNamespace, block_keys
from kvstore.redis_tier import kv_prefix
from tests.adversarial.conftest import MODEL, metric_total, stream_text
from tests.e2e.faults import poll
from tests.e2e.stack import Stack
from wire.membership import registry_key

log = logging.getLogger(__name__)

# --- 200 slow readers ------------------------------------------------------------------------

CROWD = 200
SLOTS, QUEUE = 8, 8  # the crowd stack's worker admits 16 requests; the rest are refused (429)
SEND_TIMEOUT_S = 2  # the crowd stack's stream_send_timeout_s (the default is 30)
# 20 alternatives per token make each SSE chunk ~2.2 KB, so ~45 tokens fill the ~95 KB of
# buffers between the router and a reader that reads nothing; 400 tokens never finish first.
SLOW_CHAT = {"model": MODEL, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
             "messages": [{"role": "user", "content": "Count from one to a thousand."}],
             "stream": True, "logprobs": True, "top_logprobs": 20}


@dataclass(slots=True)
class Head:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes  # a sized body (a refusal's JSON); nothing of a stream is read


@pytest.fixture
def crowd_stack(tmp_path):
    """A colocated stack of the crowd's own. On the package stack the crowd would hold every
    admission of its decode worker (32 slots + 64 queued) for the 30 s send deadline, turning
    the canary away with 429s; a small worker and a 2 s deadline also make the case cheap.
    One torch thread: the package stack's workers are busy with the canary meanwhile, and two
    torch processes each spinning a thread per core thrash (beside a 2-thread torch loop on
    2 vCPUs the crowd took 81 s to be answered with 2 threads, 10 s with 1)."""
    with Stack(tmp_path, "--colocated", "--max-slots", str(SLOTS), "--max-queue", str(QUEUE),
               "--stream-send-timeout-s", str(SEND_TIMEOUT_S), "--torch-threads", "1") as s:
        yield s


def raw_post(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def slow_reader(port: int, request: bytes) -> socket.socket:
    """A client that sends `request`, then reads nothing."""
    s = socket.socket()
    # Both before connect: the handshake fixes them. A small receive window alone is not
    # enough on loopback: Linux sizes the server's send buffer from the MSS (64 KiB there), so
    # a whole 400-token stream (~900 KB) fits in kernel buffers and no send ever blocks. A
    # 536-byte MSS keeps that buffer near 30 KB.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "the connection closed inside a response body"
        data += chunk
    return data


def read_head(s: socket.socket) -> Head | None:
    """The status line and headers once all of them arrived (None before), reading no byte of
    a stream's body: a peek finds where the head ends."""
    peek = s.recv(8192, socket.MSG_PEEK)
    assert peek, "the server closed a connection without answering"
    end = peek.find(b"\r\n\r\n")
    if end < 0:
        return None
    status_line, *lines = s.recv(end + 4).decode("latin-1").split("\r\n")
    headers = dict(line.split(":", 1) for line in lines if line)
    headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
    body = recv_exactly(s, int(headers["content-length"])) if "content-length" in headers else b""
    return Head(int(status_line.split()[1]), headers, body)


def read_heads(socks: list[socket.socket], timeout: float) -> list[Head]:
    """Every socket's head, in order. A queued request's 200 comes only once it has a slot."""
    heads: dict[socket.socket, Head] = {}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        while len(heads) < len(socks) and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                head = read_head(key.fileobj)
                if head is not None:
                    heads[key.fileobj] = head
                    sel.unregister(key.fileobj)
    assert len(heads) == len(socks), f"{len(socks) - len(heads)} clients got no answer"
    return [heads[s] for s in socks]


def assert_refused_whole(head: Head) -> None:
    assert head.status == 429, head
    assert int(head.headers["retry-after"]) >= 1
    err = json.loads(head.body)["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["message"] and err["code"] == "rate_limit_exceeded", err


def read_to_eof(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        raise AssertionError("a stuck stream was neither cut nor finished") from None
    return b"".join(chunks)


def dechunk(raw: bytes) -> tuple[bytes, bool]:
    """A chunked body's payload so far, and whether its closing (empty) chunk arrived."""
    out, pos = [], 0
    while (eol := raw.find(b"\r\n", pos)) >= 0:
        size = int(raw[pos:eol], 16)
        if size == 0:
            return b"".join(out), True
        out.append(raw[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2
    return b"".join(out), False


def assert_cut_mid_stream(raw: bytes) -> None:
    """Token chunks, then the server closed the connection: no error, no [DONE], and no
    closing chunk (the response never completed)."""
    payload, complete = dechunk(raw)
    events = payload.split(b"\n\n")[:-1]  # the last piece may end mid-event
    assert events and not complete and b"data: [DONE]" not in payload, raw[-300:]
    for event in events:
        assert event.startswith(b"data: {"), event[:300]
        assert "error" not in json.loads(event[len(b"data: "):]), event[:300]


def drained(stack: Stack) -> bool:
    """Nothing open: the router's backend calls and leases, the worker's slots and queue."""
    [health] = stack.worker_health("decode")
    return (metric_total(stack.url, "tandem:router_requests_in_flight") == 0
            and all(w["inflight"] == 0 for w in stack.workers())
            and health["running"] == 0 and health["waiting"] == 0)


def test_200_slow_readers_are_cut_and_their_slots_freed(crowd_stack, canary):
    """200 clients send a streamed chat request and never read. Each is served or refused
    whole; the served ones stall the router's sends, which it cuts after its deadline, freeing
    every slot; then a full worker's worth of fresh requests is served."""
    runs, errors = len(canary.runs), len(canary.errors)
    request = raw_post("/v1/chat/completions", SLOW_CHAT)
    socks: list[socket.socket] = []
    try:
        for _ in range(CROWD):
            socks.append(slow_reader(crowd_stack.port, request))
        start = time.monotonic()
        heads = read_heads(socks, timeout=180)
        served = [s for s, h in zip(socks, heads, strict=True) if h.status == 200]
        for head in heads:
            if head.status == 200:
                assert head.headers["content-type"].startswith("text/event-stream")
            else:
                assert_refused_whole(head)
        assert 1 <= len(served) <= SLOTS + QUEUE
        answered = time.monotonic() - start
        poll(lambda: drained(crowd_stack), 120, "the cut streams' slots to be free")
        freed = time.monotonic() - start
        for s in served:
            assert_cut_mid_stream(read_to_eof(s, timeout=10))
    finally:
        for s in socks:
            s.close()
    log.info("%d served, %d refused (429); all answered in %.1f s, slots free in %.1f s",
             len(served), CROWD - len(served), answered, freed)
    fresh = {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "temperature": 0,
             "ignore_eos": True}
    with ThreadPoolExecutor(SLOTS + QUEUE) as pool:
        texts = list(pool.map(lambda _: stream_text(crowd_stack.url, fresh),
                              range(SLOTS + QUEUE)))
    assert len(set(texts)) == 1 and texts[0]
    poll(lambda: len(canary.runs) > runs, 120, "a canary run during the crowd")
    assert len(canary.errors) == errors, canary.errors[errors:]


# --- a second stack on the same Redis --------------------------------------------------------

CLUSTER_B = "crowd-b"
TOKEN_B = "crowd-b-internal-token"
SALT = "crowd-shared-salt"
PROMPT = list(range(7000, 7100))  # token ids: one full 64-token block, then a 36-token tail
GREEDY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
          "cache_salt": SALT}


@pytest.fixture
def stack_b(tmp_path, redis):
    """Stack B: the package stack's Redis, another cluster id and token. Colocated, so its one
    worker computes every prompt token itself unless it loads some from the store."""
    with Stack(tmp_path, "--colocated", "--redis-url", redis.url, "--cluster-id", CLUSTER_B,
               "--internal-token", TOKEN_B) as s:
        yield s


def complete(stack: Stack, body: dict) -> tuple[str, int]:
    """(text, usage.prompt_tokens_details.cached_tokens) of a non-streamed completion."""
    r = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text[:300]
    out = r.json()
    return out["choices"][0]["text"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


def counters(stack: Stack) -> dict:
    [health] = stack.worker_health("decode")
    return health["counters"]


def decode_url(stack: Stack) -> str:
    [url] = [w["url"] for w in stack.workers() if w["role"] == "decode"]
    return url


def first_block_key(stack: Stack) -> str:
    """The store key of PROMPT's first block, as every worker of this model computes it."""
    [h] = stack.worker_health("decode")
    ns = KeyNamespace(h["fingerprint"], h["dtype"], h["block_size"], SALT)
    return block_keys(PROMPT, ns)[0]


def test_second_cluster_on_the_same_redis_shares_nothing(stack, stack_b, redis, canary):
    client = redis.client()
    a_key = kv_prefix("default") + first_block_key(stack)
    b_key = kv_prefix(CLUSTER_B) + first_block_key(stack_b)
    a_text, _ = complete(stack, GREEDY)
    poll(lambda: client.exists(a_key), 30, "stack A's block in Redis")

    # B serves the same prompt with the same salt, and finds none of A's blocks.
    before = counters(stack_b)
    b_text, b_cached = complete(stack_b, GREEDY)
    after = counters(stack_b)
    assert b_cached == 0
    assert after["prefix_tokens_loaded_total"] == before["prefix_tokens_loaded_total"]
    assert after["blocks_loaded_total"] == before["blocks_loaded_total"]
    computed = after["prompt_tokens_computed_total"] - before["prompt_tokens_computed_total"]
    assert computed == len(PROMPT)
    # Had B read A's block, A's block would fail B's MAC check: counted corrupt, and deleted.
    assert metric_total(decode_url(stack_b), "tandem:kvstore_corrupt_blocks_total") == 0
    assert client.exists(a_key)
    poll(lambda: client.exists(b_key), 30, "stack B's own copy of the block")

    # A repeat on A loads the block it stored.
    loaded = counters(stack)["prefix_tokens_loaded_total"]
    a_again, a_cached = complete(stack, GREEDY)
    assert a_cached >= 64
    assert counters(stack)["prefix_tokens_loaded_total"] - loaded >= 64
    assert a_text == b_text == a_again and a_text

    # Every key is under one of the two clusters' prefixes, and B's holds some.
    keys = [k.decode() for k in client.scan_iter(count=1000)]
    # Block keys under tandem:<id>:, membership under the hash tag tandem:{<id>}:.
    ours = tuple(f"tandem:{p}:" for c in ("default", CLUSTER_B) for p in (c, f"{{{c}}}"))
    assert [k for k in keys if not k.startswith(ours)] == []
    assert any(k.startswith(kv_prefix(CLUSTER_B)) for k in keys)

    # Checked last, after many probe rounds on both routers: separate registries.
    a_urls = {w["url"] for w in stack.workers()}
    b_urls = {w["url"] for w in stack_b.workers()}
    assert a_urls and b_urls and not a_urls & b_urls
    assert {m.decode() for m in client.zrange(registry_key(CLUSTER_B), 0, -1)} == b_urls
    assert not b_urls & {m.decode() for m in client.zrange(registry_key("default"), 0, -1)}
