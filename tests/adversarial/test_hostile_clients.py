"""Hostile clients against a real stack (see conftest.py). Every case asserts the status and the
OpenAI error envelope; the last test checks the canary and the workers after all of them."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kvstore.redis_tier import kv_prefix
from tests.adversarial.conftest import CANARY, INTERNAL_TOKEN, MODEL, stream_text
from tests.e2e.faults import poll
from wire.membership import WorkerAd, ad_key, encode_ad, registry_key

VOCAB = 49152  # SmolLM2's vocabulary
MAX_LEN = 8192  # the default max_model_len


def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict:
    """An OpenAI-shaped error with this status (and param/code when given)."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def post(stack, path: str, body, **kw) -> httpx.Response:
    kw.setdefault("timeout", 120)
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{stack.url}{path}", content=body,
                          headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                          **kw)
    return httpx.post(f"{stack.url}{path}", json=body, **kw)


def test_canary_is_running(canary):
    assert canary.want.strip(), "the quiet stack's canary text is empty"


# --- one request must not take the service down --------------------------------------------

@pytest.mark.parametrize("i", range(20))
def test_poison_pill_is_a_400_and_the_next_request_is_served(stack, canary, i):
    """A prompt that fills the context with max_tokens 0 passes a naive check (8192 + 0), but
    the engine needs room for one token: refused at the router, never a worker fault."""
    r = post(stack, "/v1/completions", {"model": MODEL, "prompt": [42] * MAX_LEN,
                                        "max_tokens": 0})
    assert_error(r, 400, code="context_length_exceeded")
    ok = post(stack, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_two_streams_with_the_same_request_id_both_finish(stack, canary):
    headers = {"X-Request-Id": "same-id-for-both"}

    def one(_):
        return stream_text(stack.url, CANARY, headers=headers)

    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(one, range(2)))
    assert texts == [canary.want, canary.want]


def test_completion_ids_are_the_servers(stack, canary):
    r = post(stack, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1},
             headers={"X-Request-Id": "client-chosen"})
    assert r.status_code == 200
    assert r.json()["id"] != "client-chosen" and r.headers["X-Request-Id"] == "client-chosen"


# --- bodies and sizes ----------------------------------------------------------------------

def test_50mb_body_is_413(stack, canary):
    body = json.dumps({"model": MODEL, "prompt": "x" * (50 << 20)})
    assert_error(post(stack, "/v1/completions", body), 413)


def test_10m_token_list_is_413(stack, canary):
    ids = ",".join(["1"] * 10_000_000)
    body = f'{{"model": "{MODEL}", "prompt": [{ids}]}}'
    assert_error(post(stack, "/v1/completions", body), 413)


def test_health_answers_while_a_huge_prompt_is_refused(stack, canary):
    """The router's event loop stays free while a big body arrives and is refused."""
    body = json.dumps({"model": MODEL, "prompt": "word " * 1_000_000})
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(post, stack, "/v1/completions", body)
        assert httpx.get(f"{stack.url}/health", timeout=5).status_code == 200
        assert big.result().status_code in (400, 413)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": ["fine", "\udfff"]}, "prompt"),
    ({"prompt": "a\ud83dz"}, "prompt"),
])
def test_lone_surrogates_in_prompts_are_400(stack, canary, body, param):
    r = post(stack, "/v1/completions", json.dumps({"model": MODEL, "max_tokens": 1, **body}))
    assert_error(r, 400, param=param)


@pytest.mark.parametrize("content", ["\ud800", [{"type": "text", "text": "\udc00"}]])
def test_lone_surrogates_in_messages_are_400(stack, canary, content):
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": content}]}
    err = assert_error(post(stack, "/v1/chat/completions", json.dumps(body)), 400)
    assert err["param"].startswith("messages")


# --- malformed and out-of-range fields -------------------------------------------------------

BAD_COMPLETIONS = [
    ({"prompt": [], "max_tokens": 1}, 400),
    ({"prompt": [-1], "max_tokens": 1}, 400),
    ({"prompt": [VOCAB], "max_tokens": 1}, 400),
    ({"prompt": [[1], []], "max_tokens": 1}, 400),
    ({"prompt": "hi", "max_tokens": "5"}, 400),
    ({"prompt": "hi", "max_tokens": -1}, 400),
    ({"prompt": "hi", "max_tokens": MAX_LEN}, 400),
    ({"prompt": "hi", "temperature": 3}, 400),
    ({"prompt": "hi", "temperature": "NaN"}, 400),
    ({"prompt": "hi", "top_p": 0}, 400),
    ({"prompt": "hi", "top_k": -2}, 400),
    ({"prompt": "hi", "n": 0}, 400),
    ({"prompt": "hi", "n": 129}, 400),
    ({"prompt": "hi", "seed": 2**64}, 400),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"prompt": "hi", "logprobs": 6}, 400),
    ({"prompt": "hi", "logit_bias": {str(VOCAB): 1}}, 400),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, 400),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, 400),
    ({"prompt": "hi", "stop_token_ids": [VOCAB]}, 400),
    ({"prompt": "hi", "min_tokens": 20, "max_tokens": 10}, 400),
    ({"prompt": "hi", "stream": "yes"}, 400),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400),
    ({"prompt": "hi", "suffix": "x"}, 400),
    ({"prompt": "hi", "echo": 1}, 400),
    ({"prompt": "hi", "presence_penalty": 2.5}, 400),
    ({"prompt": "hi", "repetition_penalty": 0}, 400),
    ({"prompt": "hi", "cache_salt": "x" * 300}, 400),
    ({"prompt": "hi", "model": "no-such-model"}, 404),
]


@pytest.mark.parametrize("fields, status", BAD_COMPLETIONS)
def test_bad_completion_fields(stack, canary, fields, status):
    assert_error(post(stack, "/v1/completions", {"model": MODEL, **fields}), status)


BAD_CHATS = [
    {"messages": []},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 5},
    {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
    {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
    {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
]


@pytest.mark.parametrize("fields", BAD_CHATS)
def test_bad_chat_fields(stack, canary, fields):
    assert_error(post(stack, "/v1/chat/completions", {"model": MODEL, **fields}), 400)


@pytest.mark.parametrize("body, status", [
    ("{not json", 400),
    ("[]", 400),
    ('"a string"', 400),
    ("", 400),
])
def test_malformed_json(stack, canary, body, status):
    assert_error(post(stack, "/v1/completions", body), status)


def test_wrong_content_type_is_415(stack, canary):
    r = httpx.post(f"{stack.url}/v1/completions", content=b"model=x",
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert_error(r, 415)


# --- fan-out ---------------------------------------------------------------------------------

def test_n_128_is_served_or_refused_whole(stack, canary):
    """n=128 is 128 backend calls today; a decode worker admits 32 slots + 64 queued, so the
    request is either served whole or refused whole with 429 + Retry-After, never half
    answered, and nobody else notices (the canary and the last test check that)."""
    r = post(stack, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                        "n": 128, "temperature": 1.0, "seed": 3}, timeout=600)
    if r.status_code == 429:
        assert_error(r, 429, code="rate_limit_exceeded")
        assert int(r.headers["Retry-After"]) >= 1
    else:
        assert r.status_code == 200, r.text[:300]
        assert sorted(c["index"] for c in r.json()["choices"]) == list(range(128))


def test_n_64_is_served(stack, canary):
    r = post(stack, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                        "n": 64, "temperature": 1.0, "seed": 3}, timeout=600)
    assert r.status_code == 200, r.text[:300]
    assert sorted(c["index"] for c in r.json()["choices"]) == list(range(64))


# --- the internal API ------------------------------------------------------------------------

def _worker(stack, role: str) -> str:
    return next(w["url"] for w in stack.workers() if w["role"] == role)


GENERATE = {"request_id": "direct-1", "token_ids": [1, 2, 3], "num_prompt_tokens": 3,
            "params": {"max_tokens": 2, "temperature": 0.0, "seed": 1}}


def test_worker_refuses_calls_without_the_token(stack, canary):
    r = httpx.post(f"{_worker(stack, 'decode')}/generate", json=GENERATE, timeout=30)
    assert_error(r, 401)


def test_worker_refuses_a_wrong_token(stack, canary):
    r = httpx.post(f"{_worker(stack, 'decode')}/generate", json=GENERATE, timeout=30,
                   headers={"X-Tandem-Token": INTERNAL_TOKEN + "x"})
    assert_error(r, 401)


@pytest.mark.parametrize("role, path", [("decode", "/generate"), ("prefill", "/prefill")])
def test_worker_refuses_logit_bias_out_of_range_before_streaming(stack, canary, role, path):
    body = {**GENERATE, "params": {**GENERATE["params"], "logit_bias": {str(VOCAB): 1.0}}}
    r = httpx.post(f"{_worker(stack, role)}{path}", json=body, timeout=30,
                   headers={"X-Tandem-Token": INTERNAL_TOKEN})
    assert_error(r, 400)


def test_router_refuses_logit_bias_out_of_range(stack, canary):
    r = post(stack, "/v1/completions", {"model": MODEL, "prompt": "hi",
                                        "logit_bias": {str(VOCAB + 5): 1}})
    assert_error(r, 400, param=f"logit_bias.{VOCAB + 5}")


def _probes_seen(worker_url: str) -> float:
    """How many /health probes a worker has answered (its own HTTP counter)."""
    text = httpx.get(f"{worker_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tandem:http_requests_total{") and 'route="/health"' in line)


def _wait_probe_rounds(stack, rounds: int) -> None:
    """Until the router has run `rounds` more probe rounds (each probes every worker, and reads
    the membership registry first)."""
    decode = _worker(stack, "decode")
    start = _probes_seen(decode)
    poll(lambda: _probes_seen(decode) >= start + rounds, 30, "probe rounds")


def test_forged_membership_ad_is_never_probed(stack, redis, canary):
    """An unsigned ad written straight into the registry, for a URL where we listen: the router
    never adds it and never connects to it (so never sends it the token or a prompt)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        ad = WorkerAd(url=url, role="decode", pid=1, model=MODEL, capacity=96)
        client = redis.client()
        client.set(ad_key("default", url), encode_ad(ad, "default", time.time() + 60, None),
                   px=60_000)
        client.zadd(registry_key("default"), {url: time.time() + 60})
        _wait_probe_rounds(stack, 3)
        assert url not in [w["url"] for w in stack.workers()]
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected


def test_forged_tail_key_is_never_read(stack, redis, canary):
    """Decode for prompt A naming the real, stored tail of another request's prompt B: loaded,
    it would give A B's KV. The worker recomputes the key from A's own tokens, so it neither
    reads nor deletes B's tail, and A's tokens equal a call that names no tail."""
    headers = {"X-Tandem-Token": INTERNAL_TOKEN}
    params = {"max_tokens": 8, "temperature": 0.0, "seed": 1}
    a, b = list(range(1000, 1100)), list(range(2000, 2100))  # 100 tokens: blocks + a tail
    r = httpx.post(f"{_worker(stack, 'prefill')}/prefill", headers=headers, timeout=120,
                   json={"request_id": "tail-b", "token_ids": b, "params": params})
    assert r.status_code == 200, r.text
    head = json.loads(r.text.splitlines()[0])
    [health] = stack.worker_health("prefill")
    assert head["tail_key"] and head["tail_start"] == len(b) // health["block_size"] * health[
        "block_size"] < len(b)

    def decode(extra: dict) -> list[int]:
        body = {"request_id": "tail-a", "token_ids": a, "num_prompt_tokens": len(a),
                "params": params, **extra}
        r = httpx.post(f"{_worker(stack, 'decode')}/generate", json=body, headers=headers,
                       timeout=120)
        assert r.status_code == 200, r.text
        return [json.loads(line)["token_id"] for line in r.text.splitlines() if line]

    forged = decode({"tail_key": head["tail_key"], "tail_start": head["tail_start"]})
    assert forged == decode({})
    assert redis.client().exists(kv_prefix("default") + head["tail_key"]) == 1


def _prompt_tokens_computed(stack) -> int:
    return sum(h["counters"]["prompt_tokens_computed_total"]
               for role in ("prefill", "decode") for h in stack.worker_health(role))


def _settled(stack) -> bool:
    """Nothing left but the canary (one decode sequence at most)."""
    [p], [d] = stack.worker_health("prefill"), stack.worker_health("decode")
    return p["running"] == p["waiting"] == 0 and d["waiting"] == 0 and d["running"] <= 1


def test_clients_that_leave_before_their_first_token(stack, canary):
    """100 clients each send a different long-prompt stream and close the socket at once:
    their prefills are cancelled, so only the few already in the engine get computed (each
    would take a second or two; all 100 would be minutes of prefill work)."""
    host, port = "127.0.0.1", stack.port
    prompt_tokens = 1501  # "<i>" + 1500 x " story": a prompt shares no block with another

    def leave(i: int) -> None:
        body = json.dumps({"model": MODEL, "prompt": f"{i}" + " story" * 1500,
                           "max_tokens": 64, "stream": True}).encode()
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    before = _prompt_tokens_computed(stack)
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(leave, range(100)))
    poll(lambda: _settled(stack), 120, "workers settled after the clients left")
    computed = _prompt_tokens_computed(stack) - before
    assert computed <= 10 * prompt_tokens, computed  # the canary's few tokens fit easily
    stack.wait_all_healthy()


# --- after everything ------------------------------------------------------------------------

def test_zz_canary_and_workers_are_unharmed(stack, canary):
    """Last: every canary run during the suite equals the quiet stack's text, and every worker
    is healthy with a closed circuit."""
    canary.stop()
    assert not canary.errors, canary.errors[:3]
    assert canary.runs, "the canary never finished a run"
    assert all(text == canary.want for text in canary.runs)
    workers = stack.wait_all_healthy(timeout=60)
    assert {w["role"] for w in workers} == {"prefill", "decode"}
