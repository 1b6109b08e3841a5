"""Issue 4, end to end: `tandem serve` answers like `model.generate()`, reuses prefixes through
the store, spreads load, and survives a decode worker being killed."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from router.api.planning import derive_seed
from tests.e2e.stack import Stack
from tests.redis_server import RedisServer

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def post(stack: Stack, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", json={"model": MODEL, **body}, timeout=120, **kw)


def stream_text(stack: Stack, path: str, body: dict) -> tuple[str, list[dict]]:
    chunks, text = [], []
    with httpx.stream("POST", f"{stack.url}{path}", timeout=120,
                      json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                chunks.append({"done": True})
                continue
            chunk = json.loads(payload)
            chunks.append(chunk)
            for c in chunk["choices"]:
                text.append(c.get("delta", {}).get("content") or c.get("text") or "")
    assert chunks[-1] == {"done": True}, "stream must end with data: [DONE]"
    return "".join(text), chunks[:-1]


def computed_prompt_tokens(stack: Stack) -> int:
    return sum(h["counters"]["prompt_tokens_computed_total"]
               for role in ("prefill", "decode") for h in stack.worker_health(role))


def check_chat_and_completions(stack: Stack, reference) -> None:
    want_chat, chat_ids = reference.chat(CHAT, 24)
    r = post(stack, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == want_chat
    assert body["usage"]["completion_tokens"] == len(chat_ids) + (len(chat_ids) < 24)
    got, _ = stream_text(stack, "/v1/chat/completions",
                         {"messages": CHAT, "max_tokens": 24, "temperature": 0})
    assert got == want_chat

    prompt = "The capital of France is"
    want, _ = reference.completion(prompt, 20)
    r = post(stack, "/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want
    got, _ = stream_text(stack, "/v1/completions",
                         {"prompt": prompt, "max_tokens": 20, "temperature": 0})
    assert got == want


def test_chat_and_completions_match_generate(stack, reference):
    check_chat_and_completions(stack, reference)


def test_with_redis_tier(tmp_path, reference):
    with RedisServer(tmp_path / "redis") as redis, \
         Stack(tmp_path, "--redis-url", redis.url) as s:
        check_chat_and_completions(s, reference)
        stats = s.worker_health("decode")[0]["counters"]
        assert stats["requests_total"] >= 4


def test_prefix_reuse_computes_only_new_tokens(stack, reference):
    doc = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(40))
    first = [{"role": "system", "content": doc}, {"role": "user", "content": "What is 3 squared?"}]
    second = [{"role": "system", "content": doc}, {"role": "user", "content": "And 7 squared?"}]
    assert len(reference.chat_ids(first)) >= 5 * 64
    r1 = post(stack, "/v1/chat/completions", {"messages": first, "max_tokens": 8, "temperature": 0})
    assert r1.status_code == 200, r1.text
    before = computed_prompt_tokens(stack)

    r2 = post(stack, "/v1/chat/completions", {"messages": second, "max_tokens": 8,
                                               "temperature": 0})
    assert r2.status_code == 200, r2.text
    usage = r2.json()["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 4 * 64
    # Whichever worker computed the rest (the prefill hop is skipped under a block), only the
    # uncached tokens were computed.
    assert computed_prompt_tokens(stack) - before == usage["prompt_tokens"] - cached
    assert r2.json()["choices"][0]["message"]["content"] == reference.chat(second, 8)[0]


def test_two_by_two_spreads_concurrent_streams(tmp_path, reference):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(4)]
    wants = {p: reference.completion(p, 16)[0] for p in prompts}
    with Stack(tmp_path, "--prefill-workers", "2", "--decode-workers", "2") as s:
        s.wait_all_healthy()  # /ready needs only one of each; spreading needs both
        def one(i: int) -> tuple[str, str]:
            p = prompts[i % 4]
            return p, stream_text(s, "/v1/completions",
                                  {"prompt": p, "max_tokens": 16, "temperature": 0})[0]

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(16)))
        for p, got in results:
            assert got == wants[p]
        per_worker = [h["counters"]["requests_total"] for h in s.worker_health("decode")]
        assert len(per_worker) == 2 and all(n > 0 for n in per_worker), per_worker


def test_killed_decode_worker_is_reported_and_restarted(tmp_path):
    with Stack(tmp_path) as s:
        [decode] = [w for w in s.workers() if w["role"] == "decode"]
        os.kill(decode["pid"], signal.SIGKILL)
        s.wait_ready(want=False, timeout=30)
        s.wait_ready(want=True)
        [again] = [w for w in s.workers() if w["role"] == "decode"]
        assert again["pid"] != decode["pid"]
        r = post(s, "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("flag", ["--colocated"])
def test_colocated_matches_generate(tmp_path, reference, flag):
    with Stack(tmp_path, flag) as s:
        check_chat_and_completions(s, reference)
        assert {w["role"] for w in s.workers()} == {"decode"}


# Over a block (64 tokens), so the router takes the prefill hop; under it, the decode worker
# prefills (router --local-prefill-tokens 64 in tests/e2e/stack.py).
LONG_STORY = ("Write the next line of this story. " + " ".join(
    f"On day {i} the traveller crossed river number {i} and rested." for i in range(8)))
SHORT_STORY = "Write one line about a lighthouse keeper:"


@pytest.mark.parametrize("prompt", [LONG_STORY, SHORT_STORY], ids=["prefill-hop", "decode-only"])
def test_n_choices_compute_their_prompt_once(stack, reference, prompt):
    """n > 1 forks the choices off one prompt computation (on the prefill worker, or on the
    decode worker when the hop is skipped), and each choice is still the text its own n=1
    request with the choice's seed gives (position-seeded sampling)."""
    prompt_len = len(reference.lm.tokenizer.encode(prompt))
    assert (prompt_len > 64) == (prompt is LONG_STORY)
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 11,
            "cache_salt": f"n8-{prompt_len}"}
    before = computed_prompt_tokens(stack)
    r = post(stack, "/v1/completions", {**body, "n": 8})
    assert r.status_code == 200, r.text
    assert computed_prompt_tokens(stack) - before == prompt_len
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert len(set(texts)) > 1, texts  # sampled choices differ
    for j in (0, 3, 7):
        alone = post(stack, "/v1/completions", {**body, "seed": derive_seed(11, j)})
        assert alone.status_code == 200, alone.text
        assert alone.json()["choices"][0]["text"] == texts[j], j


def test_n_greedy_choices_all_match_generate(stack, reference):
    want, _ = reference.completion(LONG_STORY, 16)
    r = post(stack, "/v1/completions", {"prompt": LONG_STORY, "max_tokens": 16, "n": 4,
                                        "temperature": 0, "cache_salt": "n4-greedy"})
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == [want] * 4


def worker_metric(stack: Stack, role: str, name: str) -> float:
    [w] = [w for w in stack.workers() if w["role"] == role]
    text = httpx.get(f"{w['url']}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{"))


def test_a_prompt_four_times_the_kv_pool_streams_through_both_workers(tmp_path, reference):
    """1P+1D with each worker's KV pool ~600 tokens: a ~2,400-token prompt is prefilled through
    the prefill worker's window, handed off, imported through the decode worker's window, and
    decoded over its cold span; the text equals generate()'s."""
    docs = Path(__file__).resolve().parents[2] / "docs"
    text = "\n\n".join(p.read_text() for p in sorted(docs.glob("*.md")))  # natural text
    ids = reference.lm.tokenizer(text).input_ids[:2400]
    prompt = reference.lm.tokenizer.decode(ids)
    want, _ = reference.completion(prompt, 16)
    budget = 600 * 46080  # SmolLM2 fp32: 30 layers x 2 x 3 heads x 64 x 4 bytes per token
    with Stack(tmp_path, "--kv-cache-bytes", str(budget)) as s:
        r = post(s, "/v1/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        assert r.json()["usage"]["prompt_tokens"] > 4 * 600 * 0.9
        for role in ("prefill", "decode"):
            assert worker_metric(s, role, "tandem:kv_cold_tokens_total") > 1000, role


def test_int8_kv_goes_through_the_handoff_and_the_prefix_cache(tmp_path):
    """1P+1D with --kv-dtype int8: the workers advertise the int8 format (the router keys the
    store by it), the prompt's int8 blocks reach the decode worker, and later requests reuse
    them. The first answer may differ from the later ones: its prompt attended over its own
    keys at full precision, theirs over the stored int8 prefix; the later ones agree."""
    doc = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(40))
    body = {"messages": [{"role": "system", "content": doc},
                         {"role": "user", "content": "What is 3 squared?"}],
            "max_tokens": 12, "temperature": 0}
    with Stack(tmp_path, "--kv-dtype", "int8") as s:
        assert {w["dtype"] for w in s.worker_health("prefill") + s.worker_health("decode")} == {
            "int8"}
        r1 = post(s, "/v1/chat/completions", body)
        assert r1.status_code == 200, r1.text
        texts = set()
        for _ in range(2):
            r = post(s, "/v1/chat/completions", body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 4 * 64
            texts.add(r.json()["choices"][0]["message"]["content"])
        assert len(texts) == 1 and "" not in texts
