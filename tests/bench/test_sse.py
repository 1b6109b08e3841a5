"""SSE parsing (pure) and the streaming client against scripted peers (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tandem.bench.client import request_body, send
from tandem.bench.records import RequestRecord
from tandem.bench.sse import StreamAccumulator, parse_line
from tests.bench.helpers import make_config

USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
         "prompt_tokens_details": {"cached_tokens": 8}}


def chunk(content: str | None = None, finish: str | None = None, **extra) -> str:
    delta = {} if content is None else {"content": content}
    body = {"id": "r1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return json.dumps(body | extra)


def new_record() -> RequestRecord:
    return RequestRecord(index=0, session=0, turn=0, prompt_words=12, max_tokens=3)


def feed(payloads: list[tuple[str, float]], end_s: float = 1.0) -> tuple[RequestRecord, str]:
    acc = StreamAccumulator(new_record())
    for payload, at in payloads:
        acc.feed(payload, at)
    text = acc.finish(end_s)
    return acc.record, text


def test_parse_line_takes_data_only():
    assert parse_line('data: {"a": 1}') == '{"a": 1}'
    assert parse_line("data:[DONE]") == "[DONE]"
    assert parse_line("") is None
    assert parse_line(": keep-alive") is None
    assert parse_line("event: error") is None


def test_usage_chunk_sets_counts_and_timings():
    record, text = feed([
        (json.dumps({"id": "r1", "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                    "content": ""}}]}), 0.05),
        (chunk("Hel"), 0.2), (chunk("lo"), 0.5), (chunk("!"), 0.6), (chunk(finish="stop"), 0.6),
        (json.dumps({"id": "r1", "choices": [], "usage": USAGE}), 0.61), ("[DONE]", 0.62),
    ])
    assert record.ok and text == "Hello!" and record.response_id == "r1"
    assert record.ttft_s == 0.2  # the empty role chunk is not the first token
    assert record.itl_s == pytest.approx([0.3, 0.1])
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (12, 3, 8)
    assert record.usage_reported and record.finish_reason == "stop"
    assert record.tpot_s == pytest.approx((1.0 - 0.2) / 2)


def test_chunks_without_usage_fall_back_to_chunk_count():
    record, _ = feed([(chunk("a"), 0.1), (chunk("b"), 0.2), ("[DONE]", 0.3)])
    assert record.ok and not record.usage_reported
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (0, 2, None)


def test_completion_text_and_null_cached_details():
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": None}
    record, text = feed([
        (json.dumps({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]}), 0.1),
        (json.dumps({"choices": [], "usage": usage}), 0.2),
    ])
    assert record.ok and text == "x" and record.cached_tokens is None
    assert record.completion_tokens == 1 and record.tpot_s == 0.0


@pytest.mark.parametrize("payload, message", [
    ('{"error": {"message": "engine died", "type": "server_error"}}', "engine died"),
    ('{"error": "plain string"}', "plain string"),
    ("not json", "malformed SSE data: not json"),
])
def test_error_events_fail_the_request(payload, message):
    record, _ = feed([(chunk("a"), 0.1), (payload, 0.2), ("[DONE]", 0.3)])
    assert not record.ok and record.error == message


def test_stream_cut_short_is_a_failure():
    record, _ = feed([(chunk("a"), 0.1)])
    assert not record.ok and "ended before" in record.error


def run_send(handler, **cfg) -> tuple[RequestRecord, str]:
    """send() through a scripted transport; returns the filled record and the answer."""
    config = make_config(**cfg)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler),
                                     base_url="http://peer") as client:
            record = new_record()
            body = request_body(config, "m", [{"role": "user", "content": "hi"}], 3)
            return record, await send(client, config, body, record)

    return asyncio.run(go())


def sse_response(*payloads: str) -> httpx.Response:
    text = "".join(f"data: {p}\n\n" for p in payloads)
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=text)


def test_send_streams_a_whole_response_and_posts_openai_body():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["path"], seen["body"] = request.url.path, json.loads(request.content)
        return sse_response(chunk("hi"), chunk(finish="stop"),
                            json.dumps({"choices": [], "usage": USAGE}), "[DONE]")

    record, text = run_send(handler)
    assert record.ok and text == "hi" and record.status_code == 200
    assert seen["path"] == "/v1/chat/completions"
    assert seen["body"]["stream"] is True and seen["body"]["temperature"] == 0.0
    assert seen["body"]["stream_options"] == {"include_usage": True}
    assert "ignore_eos" not in seen["body"]


def test_send_records_http_errors_and_transport_failures():
    def reject(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"error": {"message": "ignore_eos not allowed"}})

    record, _ = run_send(reject, ignore_eos=True, endpoint="completions")
    assert not record.ok and record.status_code == 422
    assert record.error == "HTTP 422: ignore_eos not allowed"

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    record, _ = run_send(refuse)
    assert not record.ok and record.error == "ConnectError: connection refused"

    def json_reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": []})

    record, _ = run_send(json_reply)
    assert not record.ok and "expected text/event-stream" in record.error
