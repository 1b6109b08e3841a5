"""Hostile clients at the router's edge: nothing one request sends may hurt another request, a
worker, or the event loop. Every refusal is a 4xx in OpenAI's envelope, before any backend call.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from engine.intake import check_request
from engine.sequence import SeqRequest
from tests.router.conftest import MAX_MODEL_LEN, MODEL
from tests.router.fake_backend import reply_text
from tests.router.helpers import assert_envelope, chat, cmpl, sse_payloads, stream_text
from tests.router.live_server import serve

CMPL, CHAT, TOKENIZE = "/v1/completions", "/v1/chat/completions", "/tokenize"


def post_raw(client, path: str, body) -> httpx.Response:
    """JSON with ASCII escapes, so lone surrogates travel as `\\ud800` (httpx's json= would
    fail to encode them)."""
    return client.post(path, content=json.dumps(body),
                       headers={"content-type": "application/json"})


class Chunks:
    """A streamed request body that counts how much of it the server pulled."""

    def __init__(self, chunk: bytes, count: int, head: bytes = b""):
        self.chunk, self.count, self.head = chunk, count, head
        self.pulled = 0

    def __iter__(self) -> Iterator[bytes]:
        if self.head:
            yield self.head
        for _ in range(self.count):
            self.pulled += 1
            yield self.chunk


# --- the engine's rules, checked before dispatch -------------------------------------------

def test_poison_pill_is_a_400_and_never_reaches_the_backend(client, fake):
    """A full-context prompt with max_tokens 0 passes `prompt + max_tokens <= max_model_len`,
    but the engine computes one token, so it must have room for it."""
    r = client.post(CMPL, json=cmpl(prompt=[42] * MAX_MODEL_LEN, max_tokens=0))
    err = assert_envelope(r, 400, "prompt", "context_length_exceeded")
    assert f"you requested {MAX_MODEL_LEN + 1} tokens" in err["message"]
    assert fake.requests == []
    ok = client.post(CMPL, json=cmpl(prompt=[42] * (MAX_MODEL_LEN - 1), max_tokens=0))
    assert ok.status_code == 200, ok.text  # one token of room is enough


def test_a_full_context_chat_is_refused_too(client, fake, tokenizer):
    """No max_tokens on a chat fills the context: a prompt that already fills it leaves none."""
    r = client.post(CHAT, json=chat(messages=[{"role": "user", "content": "hi " * 600}]))
    assert_envelope(r, 400, "messages", "context_length_exceeded")
    assert fake.requests == []


def test_min_tokens_must_fit_the_budget_the_context_leaves(client, fake):
    """With max_tokens omitted the budget is the context's rest; the engine refuses
    min_tokens above it."""
    r = client.post(CHAT, json=chat(min_tokens=MAX_MODEL_LEN))
    assert_envelope(r, 400, "min_tokens")
    r = client.post(CMPL, json=cmpl(max_tokens=None, min_tokens=MAX_MODEL_LEN))
    assert_envelope(r, 400, "min_tokens")
    assert fake.requests == []


VOCAB = 49152  # SmolLM2's
EDGES = [  # requests at the edges of what the router accepts
    (CMPL, cmpl(prompt=[42] * (MAX_MODEL_LEN - 1), max_tokens=0)),
    (CMPL, cmpl(prompt=[[0], [VOCAB - 1]], n=3, echo=True, logprobs=5, max_tokens=0,
                seed=-(2**63), logit_bias={"0": 100, str(VOCAB - 1): -100},
                stop_token_ids=[VOCAB - 1] * 1024)),
    (CMPL, cmpl(max_tokens=None, min_tokens=MAX_MODEL_LEN - 10, temperature=2, top_p=1e-9,
                top_k=10**9, min_p=1, repetition_penalty=100, presence_penalty=-2)),
    (CHAT, chat(logprobs=True, top_logprobs=20, seed=2**63 - 1, min_tokens=5,
                logit_bias={str(i): 1 for i in range(1024)})),
]


@pytest.mark.parametrize(("path", "body"), EDGES, ids=range(len(EDGES)))
def test_what_passes_the_router_passes_the_engine(client, fake, served_model, path, body):
    """The engine's own intake check, on every call the router made."""
    assert client.post(path, json=body).status_code == 200
    assert fake.requests
    for req in fake.requests:
        seq = SeqRequest(req.request_id, req.token_ids, len(req.token_ids), req.params)
        check_request(seq, None, served_model.vocab_size, MAX_MODEL_LEN)


# --- the body's size -----------------------------------------------------------------------

def asgi_post(app, path: str, chunks: Iterator[bytes], headers: list[tuple[bytes, bytes]]
              ) -> tuple[int, dict]:
    """Drive the ASGI app by hand: its receive() hands out `chunks` one at a time, the way a
    server reads a socket (TestClient reads the whole body before the app sees any)."""
    sent: list[dict] = []

    async def receive() -> dict:
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "server": ("test", 80),
             "client": ("test", 1), "headers": headers}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_body_over_the_limit_is_413_before_it_is_all_read(make_app, fake):
    body = Chunks(b" " * 16384, count=1000)  # 16 MB, no Content-Length
    app = make_app(fake, max_body_bytes=65536)
    status, payload = asgi_post(app, CMPL, iter(body), [(b"content-type", b"application/json")])
    assert status == 413 and payload["error"]["code"] == "request_too_large", payload
    assert payload["error"]["param"] is None
    assert body.pulled == 5, "64 KiB is 4 chunks: the 5th passes the limit, none after it"
    assert fake.requests == []


def test_content_length_over_the_limit_is_413_without_reading(make_app, fake):
    body = Chunks(b" " * 16384, count=10)
    headers = {"content-type": "application/json", "content-length": str(16384 * 10)}
    with TestClient(make_app(fake, max_body_bytes=65536), raise_server_exceptions=False) as c:
        r = c.post(CMPL, content=body, headers=headers)
    assert_envelope(r, 413, None, "request_too_large")
    assert body.pulled == 0


def test_ten_million_token_ids_are_413_fast(make_app, fake):
    """~20 MB of JSON against the default 8 MiB, over a real socket: refused once 8 MiB
    arrived, never parsed, and the client is told so (not cut off mid-upload)."""
    head = b'{"model": "%s", "prompt": [' % MODEL.encode()
    body = Chunks(b"1," * 500_000, count=20, head=head)  # 10M ids (the closing "]}" unsent)
    with serve(make_app(fake)) as url:
        start = time.monotonic()
        r = httpx.post(f"{url}{CMPL}", content=iter(body), timeout=30,
                       headers={"content-type": "application/json"})
        assert_envelope(r, 413, None, "request_too_large")
        assert time.monotonic() - start < 10
    assert fake.requests == []


# --- text that cannot be encoded ------------------------------------------------------------

SURROGATES = [
    (CMPL, cmpl(prompt="\ud800"), "prompt"),
    (CMPL, cmpl(prompt=["fine", "a\udfffb"]), "prompt"),
    (CMPL, cmpl(stop="\ud83d"), "stop"),
    (CMPL, cmpl(cache_salt="\udc00"), "cache_salt"),
    (CMPL, cmpl(model="\ud800"), "model"),
    (CHAT, chat(messages=[{"role": "user", "content": "hi \ud800"}]), "messages.0.content"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]),
     "messages.0.content.0.text"),
    (TOKENIZE, {"model": MODEL, "prompt": "\ud800"}, "prompt"),
    (TOKENIZE, {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]},
     "messages.0.content"),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATES,
                         ids=[f"{p}-{param}" for p, _, param in SURROGATES])
def test_lone_surrogates_are_400_naming_the_field(client, fake, path, body, param):
    err = assert_envelope(post_raw(client, path, body), 400, param, "invalid_value")
    assert "lone surrogate" in err["message"]
    assert fake.requests == []


def test_an_error_echoing_client_text_never_fails_to_encode(client):
    r = post_raw(client, CMPL, cmpl(logit_bias={"\ud800": 1}))
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("logit_bias.")


# --- every limit ------------------------------------------------------------------------------

USERS = [{"role": "user", "content": "x" * 60}] * 2
LIMITS = [  # (settings, path, body, param, code)
    ({"max_text_chars": 100}, CMPL, cmpl(prompt="x" * 101), "prompt",
     "string_above_max_length"),
    ({"max_text_chars": 100}, CMPL, cmpl(prompt=["x" * 60, "y" * 60]), "prompt",
     "string_above_max_length"),
    ({"max_text_chars": 100}, CHAT, chat(messages=USERS), "messages", "string_above_max_length"),
    ({"max_text_chars": 100}, TOKENIZE, {"prompt": "x" * 101}, "prompt",
     "string_above_max_length"),
    ({"max_prompts": 2}, CMPL, cmpl(prompt=["a", "b", "c"]), "prompt", "array_above_max_length"),
    ({"max_prompts": 2}, CMPL, cmpl(prompt=[[1], [2], [3]]), "prompt", "array_above_max_length"),
    ({"max_n": 2}, CMPL, cmpl(n=3), "n", "integer_above_max_value"),
    ({"max_n": 2}, CHAT, chat(n=3), "n", "integer_above_max_value"),
    ({"max_choices": 4}, CMPL, cmpl(prompt=["a", "b", "c"], n=2), "n",
     "integer_above_max_value"),
    ({"max_request_tokens": 100}, CMPL, cmpl(prompt="hi", max_tokens=200), "max_tokens",
     "request_too_large"),
    ({"max_request_tokens": 100}, CMPL, cmpl(prompt="hi", max_tokens=60, n=2), "max_tokens",
     "request_too_large"),
    ({"max_request_tokens": 100}, CHAT, chat(), "max_completion_tokens", "request_too_large"),
    ({"max_stop_strings": 1}, CMPL, cmpl(stop=["a", "b"]), "stop", "array_above_max_length"),
    ({"max_stop_chars": 5}, CHAT, chat(stop="abcdef"), "stop", "string_above_max_length"),
    ({"max_logit_bias": 1}, CMPL, cmpl(logit_bias={"1": 1, "2": 1}), "logit_bias",
     "array_above_max_length"),
    ({"max_logprobs": 2}, CMPL, cmpl(logprobs=3), "logprobs", "integer_above_max_value"),
    ({"max_logprobs": 2}, CHAT, chat(logprobs=True, top_logprobs=3), "top_logprobs",
     "integer_above_max_value"),
    ({"max_messages": 2}, CHAT, chat(messages=USERS * 2), "messages", "array_above_max_length"),
    ({"max_messages": 2}, TOKENIZE, {"messages": USERS * 2}, "messages",
     "array_above_max_length"),
    # The schema's own caps, which the settings can only lower.
    ({}, CMPL, cmpl(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias", None),
    ({}, CHAT, chat(messages=[USERS[0]] * 2049), "messages", None),
]


@pytest.mark.parametrize(("settings", "path", "body", "param", "code"), LIMITS,
                         ids=[f"{i}-{next(iter(c[0]), 'schema')}" for i, c in enumerate(LIMITS)])
def test_each_limit_is_a_400_naming_the_field(make_app, fake, settings, path, body, param, code):
    with TestClient(make_app(fake, **settings), raise_server_exceptions=False) as c:
        assert_envelope(c.post(path, json=body), 400, param, code)
    assert fake.requests == []


def test_limits_at_their_value_are_served(make_app, fake):
    limits = {"max_text_chars": 10, "max_n": 2, "max_stop_strings": 1, "max_logprobs": 2}
    with TestClient(make_app(fake, **limits)) as c:
        r = c.post(CMPL, json=cmpl(prompt="x" * 10, n=2, stop=["a"], logprobs=2, max_tokens=2))
    assert r.status_code == 200, r.text


# --- ids belong to the server -----------------------------------------------------------------

def test_two_streams_with_one_x_request_id_keep_their_own_ids(make_app, fake):
    """FakeBackend refuses a request id that is already playing, as the engine does."""
    fake.delay_s = 0.02  # ~20 events each: the two streams overlap

    def stream(seed: int, c: TestClient) -> tuple[httpx.Headers, list]:
        r = c.post(CMPL, json=cmpl(stream=True, seed=seed, max_tokens=50),
                   headers={"X-Request-Id": "same-id"})
        assert r.status_code == 200, r.text
        return r.headers, sse_payloads(r.text)

    with TestClient(make_app(fake)) as c, ThreadPoolExecutor(2) as pool:
        results = list(pool.map(stream, [1, 2], [c, c]))
    assert fake.peak_active == 2
    ids = []
    for seed, (headers, payloads) in zip([1, 2], results, strict=True):
        assert headers["x-request-id"] == "same-id"
        assert payloads[-1] == "[DONE]" and stream_text(payloads) == reply_text(seed)
        ids.append({p["id"] for p in payloads[:-1]})
    assert all(len(s) == 1 for s in ids) and ids[0] != ids[1]
    assert len({r.request_id for r in fake.requests}) == 2


# --- the event loop stays free --------------------------------------------------------------

@pytest.mark.parametrize(("path", "body"), [(CMPL, cmpl(max_tokens=2)), (CHAT, chat())])
def test_health_answers_while_a_prompt_is_tokenized(make_app, fake, tokenizer, monkeypatch,
                                                    path, body):
    entered, release = threading.Event(), threading.Event()
    encode = tokenizer.encode

    def slow_encode(*args, **kwargs):
        entered.set()
        release.wait(10)  # a long prompt's tokenization, as far as the event loop can tell
        return encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    with serve(make_app(fake)) as url, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{url}{path}", json=body, timeout=20)
        assert entered.wait(10), "the request never reached the tokenizer"
        try:
            assert httpx.get(f"{url}/health", timeout=2).status_code == 200
        finally:
            release.set()
        assert pending.result().status_code == 200
