"""The official openai SDK (sync + async) against a real uvicorn serving the app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.router.conftest import MODEL
from tests.router.fake_backend import FakeBackend, reply_ids, reply_text, token_logprob
from tests.router.live_server import serve

KEY = "sk-test"
MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def live(served_model) -> Iterator[tuple[str, FakeBackend]]:
    from router.app import create_app
    from router.settings import RouterSettings

    fake = FakeBackend(served_model.tokenizer)
    app = create_app(RouterSettings(_env_file=None, api_keys=[KEY]), fake, [served_model])
    with serve(app) as url:
        yield url, fake


@pytest.fixture
def sdk(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live[0]}/v1", api_key=KEY, max_retries=0)


def test_models_and_auth(sdk, live):
    assert [m.id for m in sdk.models.list()] == [MODEL]
    bad = openai.OpenAI(base_url=f"{live[0]}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.code == "invalid_api_key"


def test_completion_n2_stop_seed(sdk, tokenizer):
    r = sdk.completions.create(model=MODEL, prompt="Once", n=2, seed=5, stop=["ld!"],
                               max_tokens=50)
    assert [c.text for c in r.choices] == ["Hello wor", "Hello wor"]
    assert all(c.finish_reason == "stop" for c in r.choices)
    assert r.usage.completion_tokens == 2 * 3 and r.usage.prompt_tokens == 1
    assert r.usage.prompt_tokens_details.cached_tokens == 1


def test_completion_logprobs_echo(sdk, tokenizer):
    r = sdk.completions.create(model=MODEL, prompt="Once upon", echo=True, logprobs=2,
                               max_tokens=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "Once upon" and lp.token_logprobs[0] is None
    assert len(lp.tokens) == len(tokenizer.encode("Once upon"))


def test_chat_logprobs_and_usage(sdk, tokenizer):
    r = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, seed=3, logprobs=True,
                                    top_logprobs=2, max_completion_tokens=4)
    choice = r.choices[0]
    assert choice.message.content == tokenizer.decode(reply_ids(tokenizer, 3)[:4])
    assert choice.finish_reason == "length"
    assert [t.logprob for t in choice.logprobs.content] == [token_logprob(i) for i in range(4)]
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert r.usage.completion_tokens == 4


def test_chat_stream_include_usage(sdk, tokenizer):
    stream = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, seed=2, n=2,
                                         stream=True, stream_options={"include_usage": True})
    texts, usage = {0: "", 1: ""}, None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert texts[0] == reply_text(2)
    assert usage is not None and usage.completion_tokens == sum(
        len(tokenizer.encode(t)) + 1 for t in texts.values())


def test_bad_request_raises_typed_error(sdk):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3)
    assert exc.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)


def test_async_client_concurrent_and_streaming(live):
    async def go() -> None:
        client = openai.AsyncOpenAI(base_url=f"{live[0]}/v1", api_key=KEY, max_retries=0)
        calls = [client.completions.create(model=MODEL, prompt="Hi", seed=s, max_tokens=50)
                 for s in range(4)]
        results = await asyncio.gather(*calls)
        assert [r.choices[0].text for r in results] == [reply_text(s) for s in range(4)]
        stream = await client.completions.create(
            model=MODEL, prompt="Hi", seed=9, stop="seed", max_tokens=50, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        assert text == reply_text(9).split("seed")[0] and usage.total_tokens > 0
        await client.close()

    asyncio.run(go())


def wait_until(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_client_disconnect_cancels_the_backend(live):
    url, fake = live
    fake.delay_s = 0.1  # ~20 tokens: about two seconds if nobody cancels
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", headers=auth,
                          json={"model": MODEL, "prompt": "x", "stream": True,
                                "max_tokens": 50}) as r:
            next(r.iter_lines())  # the stream has started; now hang up
        stream_id = fake.requests[-1].request_id
        assert wait_until(lambda: stream_id in fake.closed)
        assert stream_id not in fake.finished
        before = len(fake.requests)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", timeout=0.2, headers=auth,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 50})
        assert wait_until(lambda: len(fake.requests) > before)
        plain_id = fake.requests[-1].request_id
        assert plain_id != stream_id
        assert wait_until(lambda: plain_id in fake.closed)
        assert plain_id not in fake.finished
    finally:
        fake.delay_s = 0.0


def test_client_leaving_before_the_first_token_cancels_the_backend(live):
    """A stream's first token can take a whole prefill; a client gone meanwhile cancels it
    then, not when the first send fails."""
    url, fake = live
    fake.delay_s = 1.0  # the first token comes after a second
    before = len(fake.requests)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", timeout=0.3,
                       headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": MODEL, "prompt": "x", "stream": True, "max_tokens": 50})
        assert wait_until(lambda: len(fake.requests) > before)
        rid = fake.requests[-1].request_id
        assert wait_until(lambda: rid in fake.closed)
        assert rid not in fake.played  # closed before its first event was produced
    finally:
        fake.delay_s = 0.0
