"""SSE: chunk shapes, usage options, errors before and after the stream starts."""

from __future__ import annotations

from engine.sequence import TokenEvent
from router.dispatch.backend import BackendOverloaded, BackendUnavailable
from tests.router.fake_backend import reply_ids, reply_text
from tests.router.helpers import chat, cmpl, sse_payloads, stream_text


def stream(client, path, body):
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return r, sse_payloads(r.text)


def test_completion_stream_matches_the_non_streamed_text(client):
    _, events = stream(client, "/v1/completions", cmpl(seed=8, max_tokens=100))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert stream_text(events) == reply_text(8)
    assert all("\ufffd" not in c["choices"][0]["text"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all("usage" not in c for c in chunks)  # no include_usage: no usage key at all
    assert all(c["object"] == "text_completion" for c in chunks)


def test_include_usage_final_chunk(client, tokenizer):
    _, events = stream(client, "/v1/completions",
                       cmpl(seed=8, n=2, stream_options={"include_usage": True}))
    *chunks, last, done = events
    assert done == "[DONE]"
    assert all(c["usage"] is None for c in chunks)
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 2 * 16
    assert last["usage"]["prompt_tokens"] == len(tokenizer.encode("Once upon a time"))


def test_continuous_usage_stats(client):
    opts = {"include_usage": True, "continuous_usage_stats": True}
    _, events = stream(client, "/v1/completions", cmpl(max_tokens=5, stream_options=opts))
    counts = [c["usage"]["completion_tokens"] for c in events[:-2]]
    assert counts == sorted(counts) and counts[-1] == 5


def test_stop_string_is_never_streamed(client):
    _, events = stream(client, "/v1/completions", cmpl(seed=5, stop="ld!", max_tokens=100))
    assert stream_text(events) == "Hello wor"


def test_chat_stream_roles_and_choices(client, fake, tokenizer):
    _, events = stream(client, "/v1/chat/completions",
                       chat(n=2, seed=3, stream_options={"include_usage": True}))
    first, second = events[0], events[1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert second["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {first["choices"][0]["index"], second["choices"][0]["index"]} == {0, 1}
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert stream_text(events, 0) == reply_text(3)
    finals = [c for e in events[:-2] for c in e["choices"] if c["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1]
    expected = sum(len(reply_ids(tokenizer, r.params.seed)) + 1 for r in fake.requests)
    assert events[-2]["usage"]["completion_tokens"] == expected


def test_chat_stream_logprobs(client):
    _, events = stream(client, "/v1/chat/completions",
                       chat(logprobs=True, top_logprobs=1, max_tokens=3))
    entries = [c for e in events[1:-1] for ch in e["choices"]
               for c in (ch["logprobs"] or {}).get("content") or []]
    assert len(entries) == 3


def test_error_after_start_is_an_error_event(client, fake):
    fake.fail_after = 3
    r, events = stream(client, "/v1/completions", cmpl(max_tokens=50))
    assert "[DONE]" not in events
    err = events[-1]["error"]
    assert err["code"] == "service_unavailable" and "lost" in err["message"]


def test_overloaded_before_start_is_429_even_when_streaming(client, fake):
    fake.fail_before = BackendOverloaded("queues full", retry_after_s=7)
    for body in (cmpl(), cmpl(stream=True), chat(stream=True)):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        r = client.post(path, json=body)
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_unavailable_is_503(client, fake):
    fake.fail_before = BackendUnavailable("no decode worker")
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503
    assert r.json()["error"] == {"message": "no decode worker", "type": "server_error",
                                 "param": None, "code": "service_unavailable"}
    assert r.headers["x-request-id"].startswith("chatcmpl-")


def test_backend_bug_is_an_enveloped_500_or_error_event(client, fake):
    def broken(req):
        raise RuntimeError("bug in the backend")

    fake.script = broken
    r = client.post("/v1/completions", json=cmpl())
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert "bug" not in r.json()["error"]["message"]  # internals stay in the log


def test_backend_bug_mid_stream(client, fake, tokenizer):
    def half_broken(req):
        return [TokenEvent(40), "not an event"]

    fake.script = half_broken
    _, events = stream(client, "/v1/completions", cmpl())
    assert events[-1]["error"]["type"] == "server_error"
