"""A worker refuses before it streams: every field the engine would choke on is a 400 in OpenAI's
envelope (no admission ticket taken, nothing streamed), and so is a body the wire models reject;
a bad internal token is a 401; a failure while starting a decode sequence is a 5xx status,
never a broken stream (a prefill's cuts its stream before the head); a worker bound beyond
loopback refuses to start without a token."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi import APIRouter

from tests.worker.apps import PROMPT, client, decode_body, lines, params, settings, worker_of
from wire.internal_api import INTERNAL_TOKEN_HEADER
from worker.app import create_worker_app

VOCAB = 49152


@pytest.fixture(scope="module")
def decode(tiny_folder):
    with client("decode", tiny_folder) as c:
        yield c


@pytest.fixture(scope="module")
def prefill(tiny_folder):
    with client("prefill", tiny_folder) as c:
        yield c


def _assert_openai_400(r, param: str | None) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


BAD = [
    ({"params": params(logit_bias={VOCAB: 1.0})}, "logit_bias"),
    ({"params": params(top_p=0.0)}, "top_p"),
    ({"params": params(max_tokens=0)}, "max_tokens"),
    ({"params": params(logprobs=21)}, "logprobs"),
    ({"params": params(stop_token_ids=[VOCAB])}, "stop_token_ids"),
    ({"params": params(seed=2**63)}, "seed"),
    ({"token_ids": [VOCAB]}, "token_ids"),
    ({"token_ids": PROMPT * 13}, "token_ids"),  # 520 >= max_model_len 512
]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_engine_refusals_are_400_before_streaming(decode, prefill, fields, param):
    for c, path in ((decode, "/generate"), (prefill, "/prefill")):
        w = worker_of(c)
        before = dict(requests=w.counters.requests_total, invalid=w.counters.requests_invalid_total)
        body = decode_body("r", PROMPT) | fields
        if "token_ids" in fields:
            body["num_prompt_tokens"] = len(fields["token_ids"])
        r = c.post(path, json=body)
        _assert_openai_400(r, param)
        assert w.counters.requests_total == before["requests"]  # never started
        assert w.counters.requests_invalid_total == before["invalid"] + 1
        assert w.admission.active == 0


def test_num_prompt_tokens_is_checked(decode):
    _assert_openai_400(decode.post("/generate", json=decode_body("r", PROMPT, 0)),
                       "num_prompt_tokens")


@pytest.mark.parametrize(("body", "param"), [
    ({"request_id": "r", "params": params(), "num_prompt_tokens": 1}, "token_ids"),
    (decode_body("r", PROMPT) | {"token_ids": "abc"}, "token_ids"),
    (decode_body("r", PROMPT) | {"params": params() | {"top_p": "high"}}, "top_p"),
])
def test_wire_validation_errors_are_openai_400(decode, body, param):
    _assert_openai_400(decode.post("/generate", json=body), param)


def test_malformed_json_is_openai_400(decode):
    r = decode.post("/generate", content=b'{"request_id": ',
                    headers={"Content-Type": "application/json"})
    _assert_openai_400(r, None)


def test_a_good_request_streams_on_while_a_bad_one_is_refused(decode):
    good = decode_body("good", PROMPT) | {"params": params(48)}
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(r=decode.post("/generate", json=good)))
    t.start()
    for i in range(5):  # several refusals while the good one runs
        bad = decode_body(f"bad-{i}", PROMPT) | {"params": params(48, logit_bias={VOCAB: 1.0})}
        _assert_openai_400(decode.post("/generate", json=bad), "logit_bias")
    t.join(timeout=120)
    assert got["r"].status_code == 200
    events = lines(got["r"].text)
    assert len(events) == 48 and events[-1]["finish_reason"] == "length"


def test_a_failure_while_starting_is_a_5xx_status(decode, monkeypatch):
    w = worker_of(decode)

    def broken(keys):
        raise RuntimeError("store exploded")

    monkeypatch.setattr(w.store, "lookup_prefix", broken)
    r = decode.post("/generate", json=decode_body("r", PROMPT))
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert w.admission.active == 0


def test_a_prefill_that_fails_cuts_its_stream_before_the_head(prefill, monkeypatch):
    """A prefill computes after its 200 (so that a long one can send keepalives): a failure
    there cuts the stream before any line, which the router counts as a worker failure, as it
    did the 500 before; the admission ticket comes back."""
    w = worker_of(prefill)

    def broken(keys):
        raise RuntimeError("store exploded")

    monkeypatch.setattr(w.store, "lookup_prefix", broken)
    r = prefill.post("/prefill", json=decode_body("r", PROMPT))
    assert r.status_code == 200 and lines(r.text) == []
    assert w.admission.active == 0


def test_internal_token_is_required_and_compared(tiny_folder):
    with client("decode", tiny_folder, internal_token="s3cret-tøken") as c:
        body = decode_body("r", PROMPT) | {"params": params(1)}
        for headers in ({}, {INTERNAL_TOKEN_HEADER: "wrong"}, {INTERNAL_TOKEN_HEADER: "s3cret"}):
            r = c.post("/generate", json=body, headers=headers)
            assert r.status_code == 401, headers
            err = r.json()["error"]
            assert err["code"] == "invalid_internal_token" and err["type"]
        right = {INTERNAL_TOKEN_HEADER: "s3cret-tøken".encode()}
        assert c.post("/generate", json=body, headers=right).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no token


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "worker.example"])
def test_refuses_to_start_exposed_without_a_token(tiny_folder, host):
    with pytest.raises(ValueError, match="internal token"):
        create_worker_app(settings(tiny_folder, host=host), APIRouter())
    create_worker_app(settings(tiny_folder, host=host, internal_token="t"), APIRouter())


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.1", "::1", "localhost"])
def test_loopback_needs_no_token(tiny_folder, host):
    create_worker_app(settings(tiny_folder, host=host), APIRouter())


def fork(rid: str, **kw) -> dict:
    return {"request_id": rid, "params": params(**kw)}


@pytest.mark.parametrize(("fields", "param"), [
    ({"forks": [fork("f", logit_bias={VOCAB: 1.0})]}, "logit_bias"),  # each fork is checked
    ({"forks": [fork("r")]}, "forks"),  # a fork's id is the request's
    ({"forks": [fork("f"), fork("f")]}, "forks"),
    ({"forks": [fork(f"f{i}") for i in range(200)]}, "forks"),  # more than the worker holds
])
def test_bad_forks_are_400_before_streaming(decode, prefill, fields, param):
    for c, path in ((decode, "/generate"), (prefill, "/prefill")):
        _assert_openai_400(c.post(path, json=decode_body("r", PROMPT) | fields), param)
        assert worker_of(c).admission.active == 0


def test_forks_need_a_fresh_prompt(decode):
    body = decode_body("r", PROMPT + [5], len(PROMPT)) | {"forks": [fork("f")]}
    _assert_openai_400(decode.post("/generate", json=body), "forks")


def test_forks_stream_side_by_side_each_as_it_would_alone(decode):
    """One call, three sequences: the prompt is computed once, and each sequence's tokens are
    the ones its own call with the same params gives (position-seeded sampling)."""
    w = worker_of(decode)
    before = w.counters.prompt_tokens_computed_total
    body = decode_body("g", PROMPT) | {"params": params(6, temperature=1.0, seed=1),
                                       "cache_salt": "forks-only",  # nothing cached
                                       "forks": [fork("g1", max_tokens=3, temperature=1.0,
                                                      seed=2),
                                                 fork("g2", max_tokens=6, temperature=1.0,
                                                      seed=3)]}
    r = decode.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert w.counters.prompt_tokens_computed_total - before == len(PROMPT)
    got: dict[str, list[int]] = {}
    for ev in lines(r.text):
        got.setdefault(ev["seq_id"], []).append(ev["token_id"])
    assert {k: len(v) for k, v in got.items()} == {"g": 6, "g1": 3, "g2": 6}
    for rid, seed, n in (("g1", 2, 3), ("g2", 3, 6)):
        alone = decode.post("/generate", json=decode_body(f"{rid}-alone", PROMPT) | {
            "params": params(n, temperature=1.0, seed=seed)})
        assert [e["token_id"] for e in lines(alone.text)] == got[rid]
    assert w.admission.active == 0


def test_prefill_forks_return_a_first_token_each(prefill):
    body = decode_body("p", PROMPT) | {"params": params(4, temperature=1.0, seed=1),
                                       "forks": [fork("p1", temperature=1.0, seed=2)]}
    r = prefill.post("/prefill", json=body)
    assert r.status_code == 200, r.text
    head = lines(r.text)[0]
    assert [f["seq_id"] for f in head["forks"]] == ["p1"]
    alone = prefill.post("/prefill", json=decode_body("p1-alone", PROMPT) | {
        "params": params(4, temperature=1.0, seed=2)})
    assert head["forks"][0]["token_id"] == lines(alone.text)[0]["event"]["token_id"]


def test_abort_ends_one_fork_and_the_others_finish(decode):
    """POST /abort stops one sequence of a call with forks; the call's stream goes on for the
    others and ends when they finish, and every admission unit comes back."""
    w = worker_of(decode)
    body = decode_body("ab", PROMPT) | {"params": params(60), "cache_salt": "abort-one",
                                        "forks": [fork("ab1", max_tokens=60)]}
    got: dict = {}
    with decode.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            ev = json.loads(line)
            got.setdefault(ev["seq_id"], []).append(ev)
            if len(got.get("ab1", [])) == 2 and "aborted" not in got:
                got["aborted"] = decode.post("/abort", json={"request_id": "ab1"}).status_code
    assert got["aborted"] == 204
    assert len(got["ab"]) == 60 and got["ab"][-1]["finish_reason"] == "length"
    assert 2 <= len(got["ab1"]) < 60 and all(e.get("finish_reason") is None for e in got["ab1"])
    assert w.admission.active == 0
