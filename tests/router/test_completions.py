"""POST /v1/completions against a scripted backend: text, finish, usage, echo, logprobs."""

from __future__ import annotations

from fastapi.testclient import TestClient

from engine.sequence import TokenEvent
from router.api.planning import derive_seed
from tests.router.conftest import MAX_MODEL_LEN
from tests.router.fake_backend import (
    CACHED_TOKENS,
    prompt_logprob,
    reply_ids,
    reply_text,
    token_logprob,
)
from tests.router.helpers import cmpl

PROMPT = "Once upon a time"


def post(client, **fields):
    r = client.post("/v1/completions", json=cmpl(**fields))
    assert r.status_code == 200, r.text
    return r


def test_text_finish_usage_and_id(client, tokenizer):
    r = post(client, max_tokens=100, seed=7)
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-") and r.headers["x-request-id"] == body["id"]
    choice = body["choices"][0]
    assert choice == {"index": 0, "text": reply_text(7), "logprobs": None, "finish_reason": "stop"}
    prompt_len = len(tokenizer.encode(PROMPT))
    generated = len(reply_ids(tokenizer, 7)) + 1  # the EOS counts
    assert body["usage"] == {
        "prompt_tokens": prompt_len, "completion_tokens": generated,
        "total_tokens": prompt_len + generated,
        "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS},
    }


def test_incoming_request_id_is_echoed_but_never_used(client, fake):
    """The client's id is only echoed: the completion id and the backend's ids are ours."""
    r = client.post("/v1/completions", json=cmpl(), headers={"X-Request-Id": "trace-42"})
    body = r.json()
    assert body["id"].startswith("cmpl-") and r.headers["x-request-id"] == "trace-42"
    assert fake.requests[0].request_id == f"{body['id']}-0"


def test_max_tokens_gives_length(client, tokenizer):
    body = post(client, max_tokens=3, seed=1).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == tokenizer.decode(reply_ids(tokenizer, 1)[:3])
    assert body["usage"]["completion_tokens"] == 3


def test_eos_on_the_last_allowed_token_is_stop(client, fake):
    fake.script = lambda req: [TokenEvent(40, finish_reason=None),
                               TokenEvent(2, finish_reason="length")]
    body = post(client, max_tokens=2).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 2


def test_prompts_times_n_indices_and_seeds(client, fake):
    body = post(client, prompt=[[9], [1, 2, 3]], n=2, seed=11, max_tokens=50).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    seeds = {r.request_id.rsplit("-", 1)[1]: r.params.seed for r in fake.requests}
    assert seeds == {"0": 11, "1": derive_seed(11, 1), "2": 11, "3": derive_seed(11, 1)}
    texts = [c["text"] for c in body["choices"]]
    assert texts == [reply_text(11), reply_text(derive_seed(11, 1))] * 2
    assert texts[0] != texts[1]
    assert body["usage"]["prompt_tokens"] == 1 + 3  # each prompt counted once, not per n
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 1 + 3


def test_choices_of_a_prompt_go_to_the_backend_together(make_app, fake):
    """n > 1: one generate_group call per prompt (its prompt computed once), split into calls
    of choices_per_call."""
    with TestClient(make_app(fake, choices_per_call=3)) as c:
        assert post(c, prompt=[[9], [1, 2, 3]], n=4, max_tokens=5).status_code == 200
    sizes = sorted((g[0].rsplit("-", 1)[1], len(g)) for g in fake.groups)
    assert sizes == [("0", 3), ("3", 1), ("4", 3), ("7", 1)]


def test_seed_is_always_set(client, fake):
    post(client)
    post(client)
    seeds = [r.params.seed for r in fake.requests]
    assert None not in seeds and seeds[0] != seeds[1]


def test_echo_logprobs_max_tokens_zero_scores_the_prompt(client, fake, tokenizer):
    """lm-eval's loglikelihood request."""
    body = post(client, echo=True, logprobs=1, max_tokens=0, temperature=0).json()
    ids = tokenizer.encode(PROMPT)
    (req,) = fake.requests
    assert req.params.max_tokens == 1 and req.params.prompt_logprobs == 1
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([i]) for i in ids]
    assert lp["token_logprobs"] == [None] + [prompt_logprob(i) for i in range(1, len(ids))]
    assert lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {tokenizer.decode([ids[1]]): prompt_logprob(1)}
    assert lp["text_offset"] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert body["usage"]["completion_tokens"] == 0


def test_echo_with_generation_offsets_continue_after_the_prompt(client, tokenizer):
    body = post(client, echo=True, logprobs=0, max_tokens=2, seed=3).json()
    choice = body["choices"][0]
    gen = reply_ids(tokenizer, 3)[:2]
    assert choice["text"] == PROMPT + tokenizer.decode(gen)
    lp = choice["logprobs"]
    n_prompt = len(tokenizer.encode(PROMPT))
    assert len(lp["tokens"]) == n_prompt + 2
    assert lp["text_offset"][n_prompt] == len(PROMPT)
    assert lp["token_logprobs"][n_prompt:] == [token_logprob(0), token_logprob(1)]


def test_logprobs_legacy_format(client, served_model, tokenizer):
    body = post(client, logprobs=3, max_tokens=5, seed=2).json()
    lp = body["choices"][0]["logprobs"]
    ids = reply_ids(tokenizer, 2)[:5]
    assert lp["token_logprobs"] == [token_logprob(i) for i in range(5)]
    assert lp["tokens"] == [served_model.token_text.display(i) for i in ids]
    # the k best plus the chosen token
    assert all(len(d) <= 4 and tok in d
               for d, tok in zip(lp["top_logprobs"], lp["tokens"], strict=True))
    text = body["choices"][0]["text"]
    for off, tok in zip(lp["text_offset"], lp["tokens"], strict=True):
        if not tok.startswith("bytes:"):  # half a character has no text of its own
            assert text[off:].startswith(tok)


def test_partial_character_tokens_show_as_bytes(client, tokenizer):
    body = post(client, logprobs=0, max_tokens=100, seed=0).json()
    tokens = body["choices"][0]["logprobs"]["tokens"]
    assert any(t.startswith("bytes:\\x") for t in tokens)  # the emoji's leading bytes


def test_stop_string_split_across_tokens(client, fake, tokenizer):
    ids = reply_ids(tokenizer, 5)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[1] == " world" and pieces[2] == "!"  # so "ld!" spans two tokens
    body = post(client, seed=5, max_tokens=100, stop=["ld!"]).json()
    choice = body["choices"][0]
    assert choice["text"] == "Hello wor" and choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 3  # up to the token completing the stop
    (req,) = fake.requests
    assert req.request_id in fake.closed and req.request_id not in fake.finished


def test_include_stop_str_in_output(client):
    body = post(client, seed=5, max_tokens=100, stop="ld!", include_stop_str_in_output=True)
    assert body.json()["choices"][0]["text"] == "Hello world!"


def test_stop_token_ids(client, tokenizer):
    ids = reply_ids(tokenizer, 5)
    body = post(client, seed=5, max_tokens=100, stop_token_ids=[ids[2]]).json()
    choice = body["choices"][0]
    assert choice["text"] == "Hello world" and choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 3


def test_ignore_eos_and_special_tokens(client, fake):
    fake.script = lambda req: [TokenEvent(40), TokenEvent(2), TokenEvent(40,
                               finish_reason="length")]
    body = post(client, max_tokens=3, ignore_eos=True).json()
    assert body["choices"][0]["finish_reason"] == "length"
    shown = post(client, max_tokens=3, ignore_eos=True, skip_special_tokens=False).json()
    assert "<|im_end|>" in shown["choices"][0]["text"]
    assert fake.requests[0].params.ignore_eos is True


def test_sampling_fields_reach_the_backend(client, fake):
    post(client, temperature=0.5, top_p=0.9, top_k=99999999, min_p=0.1, presence_penalty=0.5,
         frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={"42": -100}, seed=9,
         min_tokens=2, stop_token_ids=[7], cache_salt="tenant-a", max_tokens=20)
    (req,) = fake.requests
    p = req.params
    assert (p.temperature, p.top_p, p.min_p, p.seed) == (0.5, 0.9, 0.1, 9)
    assert p.top_k == 49152  # clamped to the vocabulary
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert p.logit_bias == {42: -100.0}
    assert (p.min_tokens, p.stop_token_ids, p.max_tokens) == (2, [7], 20)
    assert req.cache_salt == "tenant-a"


def test_null_max_tokens_fills_the_context(client, fake, tokenizer):
    post(client, max_tokens=None)
    assert fake.requests[0].params.max_tokens == MAX_MODEL_LEN - len(tokenizer.encode(PROMPT))
