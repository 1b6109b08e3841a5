"""Bad requests: the right status, OpenAI's envelope, and `param` naming the field."""

from __future__ import annotations

import pytest

from tests.router.conftest import MAX_MODEL_LEN, MODEL
from tests.router.helpers import assert_envelope

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def cmpl(**fields):
    return {"model": MODEL, "prompt": "hello", **fields}


def chat(**fields):
    return {"model": MODEL, "messages": USER, **fields}


# (path, body, status, param, code); code None means "don't care".
CASES = [
    (CMPL, {"prompt": "x"}, 400, "model", "missing_required_parameter"),
    (CMPL, {"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    (CMPL, cmpl(model="nope"), 404, "model", "model_not_found"),
    (CMPL, cmpl(model=7), 400, "model", "invalid_type"),
    (CMPL, cmpl(prompt=5), 400, "prompt", "invalid_type"),
    (CMPL, cmpl(prompt=[]), 400, "prompt", None),
    (CMPL, cmpl(prompt=""), 400, "prompt", None),
    (CMPL, cmpl(prompt=[[]]), 400, "prompt.0", None),
    (CMPL, cmpl(prompt=[-1]), 400, "prompt.0", None),
    (CMPL, cmpl(prompt=[10**9]), 400, "prompt", None),
    (CMPL, cmpl(temperature=2.5), 400, "temperature", "invalid_value"),
    (CMPL, cmpl(temperature=-0.1), 400, "temperature", "invalid_value"),
    (CMPL, cmpl(temperature="hot"), 400, "temperature", "invalid_type"),
    (CMPL, cmpl(top_p=0), 400, "top_p", None),
    (CMPL, cmpl(top_p=1.5), 400, "top_p", None),
    (CMPL, cmpl(n=0), 400, "n", None),
    (CMPL, cmpl(n=129), 400, "n", None),
    (CMPL, cmpl(n=1.5), 400, "n", "invalid_type"),
    (CMPL, cmpl(presence_penalty=2.1), 400, "presence_penalty", None),
    (CMPL, cmpl(frequency_penalty=-3), 400, "frequency_penalty", None),
    (CMPL, cmpl(logprobs=6), 400, "logprobs", None),
    (CMPL, cmpl(logprobs="yes"), 400, "logprobs", "invalid_type"),
    (CMPL, cmpl(logprobs=True), 400, "logprobs", "invalid_type"),
    (CMPL, cmpl(max_tokens=-1), 400, "max_tokens", None),
    (CMPL, cmpl(max_tokens="16"), 400, "max_tokens", "invalid_type"),
    (CMPL, cmpl(max_tokens=MAX_MODEL_LEN), 400, "prompt", "context_length_exceeded"),
    (CMPL, cmpl(stream=0), 400, "stream", "invalid_type"),
    (CMPL, cmpl(stream="true"), 400, "stream", "invalid_type"),
    (CMPL, cmpl(echo=1), 400, "echo", "invalid_type"),
    (CMPL, cmpl(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    (CMPL, cmpl(stop=5), 400, "stop", "invalid_type"),
    (CMPL, cmpl(seed=2**64), 400, "seed", None),
    (CMPL, cmpl(seed="1"), 400, "seed", "invalid_type"),
    (CMPL, cmpl(logit_bias={"abc": 1}), 400, "logit_bias.abc", None),
    (CMPL, cmpl(logit_bias={"5": 101}), 400, "logit_bias.5", None),
    (CMPL, cmpl(logit_bias={"99999999": 1}), 400, "logit_bias.99999999", None),
    (CMPL, cmpl(suffix="tail"), 400, "suffix", None),
    (CMPL, cmpl(stream_options={"include_usage": True}), 400, "stream_options", None),
    (CMPL, cmpl(stream=True, stream_options={"include_usage": 1}), 400,
     "stream_options.include_usage", "invalid_type"),
    (CMPL, cmpl(top_k=-2), 400, "top_k", None),
    (CMPL, cmpl(min_p=1.5), 400, "min_p", None),
    (CMPL, cmpl(repetition_penalty=0), 400, "repetition_penalty", None),
    (CMPL, cmpl(min_tokens=20, max_tokens=10), 400, "min_tokens", None),
    (CMPL, cmpl(stop_token_ids=[10**8]), 400, "stop_token_ids", None),
    (CMPL, cmpl(ignore_eos="no"), 400, "ignore_eos", "invalid_type"),
    (CMPL, cmpl(n=128, prompt=["a"] * 17), 400, "n", None),
    (CHAT, {"model": MODEL}, 400, "messages", "missing_required_parameter"),
    (CHAT, chat(messages=[]), 400, "messages", None),
    (CHAT, chat(messages="hi"), 400, "messages", "invalid_type"),
    (CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages.0.tool_call_id",
     "missing_required_parameter"),
    (CHAT, chat(messages=[{"content": "x"}]), 400, "messages.0.role", None),
    (CHAT, chat(messages=[{"role": "user"}]), 400, "messages.0.content", None),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content", None),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages.0.content.0.type", None),
    (CHAT, chat(messages=[USER[0], {"role": "user", "content": [{"type": "text"}]}]), 400,
     "messages.1.content.0.text", None),
    (CHAT, chat(logprobs=1), 400, "logprobs", "invalid_type"),
    (CHAT, chat(top_logprobs=3), 400, "top_logprobs", None),
    (CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    (CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    (CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    (CHAT, chat(max_completion_tokens=MAX_MODEL_LEN), 400, "messages",
     "context_length_exceeded"),
    (CHAT, chat(response_format={"type": "yaml"}), 400, "response_format.type", None),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f f"}}]), 400,
     "tools.0.function.name", None),
    (CHAT, chat(tool_choice="auto"), 400, "tool_choice", None),
    (CHAT, chat(n=-1), 400, "n", None),
    (CHAT, chat(model="gpt-4"), 404, "model", "model_not_found"),
    ("/tokenize", {"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    ("/tokenize", {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages.0.role",
     None),
    ("/detokenize", {"model": MODEL, "tokens": [-5]}, 400, "tokens.0", None),
    ("/detokenize", {"model": MODEL, "tokens": [10**9]}, 400, "tokens", None),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), CASES,
                         ids=[f"{i}-{c[3]}" for i, c in enumerate(CASES)])
def test_bad_request(client, fake, path, body, status, param, code):
    err = assert_envelope(client.post(path, json=body), status, param, code)
    if status == 400 and param:
        assert f"`{param.split('.')[0]}" in err["message"] or param in err["message"]
    assert fake.requests == [], "a bad request must never reach the backend"


def test_context_length_message_states_the_numbers(client):
    r = client.post(CMPL, json=cmpl(max_tokens=MAX_MODEL_LEN))
    msg = r.json()["error"]["message"]
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in msg
    assert f"you requested {MAX_MODEL_LEN + 1} tokens (1 in the prompt, {MAX_MODEL_LEN} in the " \
           "completion)" in msg


RAW_CASES = [
    ("malformed JSON", CMPL, b'{"model": ', "application/json", 400, "invalid_json"),
    ("JSON array body", CMPL, b"[1, 2]", "application/json", 400, "invalid_type"),
    ("empty body", CMPL, b"", "application/json", 400, "missing_body"),
    ("text/plain", CMPL, b'{"model": "m"}', "text/plain", 415, "unsupported_media_type"),
    ("form body", CHAT, b"model=m", "application/x-www-form-urlencoded", 415, None),
    ("no content type", CHAT, b"{}", "", 415, None),
    ("NaN literal", CMPL, b'{"model": "%s", "prompt": "x", "top_p": NaN}' % MODEL.encode(),
     "application/json", 400, None),
    ("Infinity literal", CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": "x"}],'
     b' "temperature": Infinity}' % MODEL.encode(), "application/json", 400, None),
]


@pytest.mark.parametrize(("name", "path", "raw", "ctype", "status", "code"), RAW_CASES,
                         ids=[c[0] for c in RAW_CASES])
def test_bad_body(client, name, path, raw, ctype, status, code):
    headers = {"content-type": ctype} if ctype else {}
    err = assert_envelope(client.post(path, content=raw, headers=headers), status,
                          param=err_param(name), code=code)
    assert err["type"] == "invalid_request_error"


def err_param(name: str) -> str | None:
    return {"NaN literal": "top_p", "Infinity literal": "temperature"}.get(name)


def test_unknown_path_and_method_are_enveloped(client):
    assert_envelope(client.get("/v1/nothing"), 404)
    err = assert_envelope(client.get(CMPL), 405)
    assert "GET /v1/completions" in err["message"]
    assert_envelope(client.delete("/v1/models"), 405)


def test_unknown_fields_are_ignored(client):
    r = client.post(CMPL, json=cmpl(max_tokens=2, best_of=1, whatever={"x": 1}))
    assert r.status_code == 200, r.text
