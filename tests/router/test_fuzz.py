"""Property: whatever the body, never a 5xx, and every 4xx is OpenAI's envelope."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from router.app import create_app
from router.settings import RouterSettings
from tests.router.conftest import MODEL
from tests.router.fake_backend import FakeBackend

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=6,
)
TOKEN = st.integers(0, 49151) | st.integers(-3, 49160)
TEXT = st.text(min_size=1, max_size=12) | st.text(max_size=12)
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"]),
                              "text": TEXT})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "user", "system", "assistant", "developer", "tool"]),
     "content": TEXT | st.lists(PART, max_size=2) | st.none()},
    optional={"name": TEXT},
)
STREAM_OPTIONS = st.fixed_dictionaries({}, optional={
    "include_usage": st.booleans(), "continuous_usage_stats": st.booleans()})


def maybe(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly sensible values, sometimes anything at all (wrong types included)."""
    # Not one_of: it would flatten ANY_JSON's many branches and drown the plausible ones.
    return st.integers(0, 4).flatmap(lambda i: ANY_JSON if i == 4 else plausible)


SAMPLING = {
    "n": maybe(st.integers(0, 3)),
    "temperature": maybe(st.floats(-0.5, 2.5)),
    "top_p": maybe(st.floats(-0.1, 1.1)),
    "seed": maybe(st.integers(-(2**64), 2**64)),
    "stop": maybe(TEXT | st.lists(TEXT, max_size=5)),
    "stream": maybe(st.booleans()),
    "stream_options": maybe(STREAM_OPTIONS),
    "presence_penalty": maybe(st.floats(-3, 3)),
    "frequency_penalty": maybe(st.floats(-3, 3)),
    "logit_bias": maybe(st.dictionaries(st.integers(-1, 50000).map(str), st.floats(-120, 120),
                                        max_size=2)),
    "user": maybe(TEXT),
    "top_k": maybe(st.integers(-3, 60000)),
    "min_p": maybe(st.floats(-0.1, 1.1)),
    "repetition_penalty": maybe(st.floats(-0.5, 3)),
    "ignore_eos": maybe(st.booleans()),
    "min_tokens": maybe(st.integers(-1, 40)),
    "stop_token_ids": maybe(st.lists(TOKEN, max_size=3)),
    "include_stop_str_in_output": maybe(st.booleans()),
    "skip_special_tokens": maybe(st.booleans()),
    "cache_salt": maybe(TEXT),
    "unknown_field": ANY_JSON,
}


@st.composite
def bodies(draw, required: dict, optional: dict) -> dict:
    """The required fields (usually), plus a few optional ones: enough valid bodies get
    through validation to exercise generation, streaming and the formatters too."""
    # integers(0, 9) < 9: hypothesis favours 0, so "present" must be the small outcome.
    body = {k: draw(v) for k, v in required.items() if draw(st.integers(0, 9)) < 9}
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        body[key] = draw(optional[key])
    return body


MODEL_FIELD = maybe(st.sampled_from([MODEL, MODEL, MODEL, "other-model"]))
COMPLETION = bodies(
    {"model": MODEL_FIELD,
     "prompt": maybe(TEXT | st.lists(TOKEN, max_size=4) | st.lists(TEXT, max_size=3)
                     | st.lists(st.lists(TOKEN, max_size=3), max_size=2))},
    {**SAMPLING,
     "max_tokens": maybe(st.integers(-1, 600) | st.none()),
     "echo": maybe(st.booleans()),
     "logprobs": maybe(st.integers(-1, 6)),
     "suffix": maybe(st.none() | TEXT)},
)
CHAT = bodies(
    {"model": MODEL_FIELD, "messages": maybe(st.lists(MESSAGE, min_size=1, max_size=3))},
    {**SAMPLING,
     "max_tokens": maybe(st.integers(-1, 600) | st.none()),
     "max_completion_tokens": maybe(st.integers(-1, 600) | st.none()),
     "logprobs": maybe(st.booleans()),
     "top_logprobs": maybe(st.integers(-1, 21)),
     "response_format": maybe(st.fixed_dictionaries({"type": st.sampled_from(
         ["text", "json_object"])})),
     "tools": maybe(st.just([]) | st.lists(ANY_JSON, max_size=1))},
)
TOKENIZE = bodies(
    {"model": maybe(st.just(MODEL))},
    {"prompt": maybe(TEXT), "messages": maybe(st.lists(MESSAGE, max_size=2)),
     "add_generation_prompt": maybe(st.booleans()), "add_special_tokens": maybe(st.booleans()),
     "continue_final_message": maybe(st.booleans()), "tokens": maybe(st.lists(TOKEN, max_size=3))},
)
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_client(served_model) -> Iterator[TestClient]:
    app = create_app(RouterSettings(_env_file=None), FakeBackend(served_model.tokenizer),
                     models=[served_model])
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def check(client: TestClient, path: str, body: dict) -> None:
    r = client.post(path, json=body)
    event(f"{path} {r.status_code}")
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, r.text
        assert err["type"] == "invalid_request_error"
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", r.text
        for e in events[:-1]:
            assert "error" not in json.loads(e), (body, e)
    else:
        assert "choices" in r.json() or "tokens" in r.json() or "prompt" in r.json()


@FUZZ
@given(body=COMPLETION)
def test_completions_never_5xx(fuzz_client, body):
    check(fuzz_client, "/v1/completions", body)


@FUZZ
@given(body=CHAT)
def test_chat_never_5xx(fuzz_client, body):
    check(fuzz_client, "/v1/chat/completions", body)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=TOKENIZE, path=st.sampled_from(["/tokenize", "/detokenize"]))
def test_tokenizer_endpoints_never_5xx(fuzz_client, body, path):
    check(fuzz_client, path, body)
