"""Issue 5 against a real stack: the official OpenAI SDK parses every response, greedy text is
`generate()`'s, stop strings cut exactly, seeded n=2 is reproducible, and echo+logprobs match a
direct forward pass."""

from __future__ import annotations

import asyncio

import httpx
import openai
import torch

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


def test_sync_chat_and_completions_match_generate(stack, reference):
    c = client(stack)
    want, _ = reference.chat(CHAT, 20)
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in c.models.list().data] == [MODEL]

    want, ids = reference.completion("Water boils at", 12)
    r = c.completions.create(model=MODEL, prompt="Water boils at", max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens == len(ids)


def test_streaming_with_usage_and_stop_string(stack, reference):
    full, _ = reference.chat(CHAT, 20)
    words = full.split(" ")
    assert len(words) > 3, full
    stop = " " + words[3]
    stream = client(stack).chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, stop=[stop],
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full[: full.index(stop)]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens >= 1
    assert usage.prompt_tokens == len(reference.chat_ids(CHAT))


def test_seeded_n2_is_reproducible_and_diverse(stack):
    c = client(stack)
    kw = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=1.0, n=2, seed=1234)
    first, again = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    texts = [ch.message.content for ch in first.choices]
    assert [ch.index for ch in first.choices] == [0, 1]
    assert texts == [ch.message.content for ch in again.choices]
    assert texts[0] != texts[1]
    assert 2 <= first.usage.completion_tokens <= 2 * 16  # both choices counted
    other = c.chat.completions.create(**{**kw, "seed": 99})
    assert [ch.message.content for ch in other.choices] != texts


def test_chat_logprobs_are_typed_and_consistent(stack):
    r = client(stack).chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert abs(item.logprob - item.top_logprobs[0].logprob) < 1e-4


def test_async_streaming_completions(stack, reference):
    want, _ = reference.completion("The three primary colours are", 12)

    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x") as c:
            stream = await c.completions.create(
                model=MODEL, prompt="The three primary colours are", max_tokens=12,
                temperature=0, stream=True)
            return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    assert asyncio.run(run()) == want


def test_echo_logprobs_match_forward_pass(stack, smollm_fp32):
    prompt = "The quick brown fox jumps over the lazy dog because it was"
    ids = httpx.post(f"{stack.url}/tokenize", json={"model": MODEL, "prompt": prompt},
                     timeout=30).json()["tokens"]
    r = client(stack).completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and lp.token_logprobs[0] is None
    with torch.inference_mode():
        logits = smollm_fp32.model(torch.tensor([ids])).logits[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor(lp.token_logprobs[1:])
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
