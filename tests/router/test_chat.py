"""POST /v1/chat/completions: template, budgets, logprobs format."""

from __future__ import annotations

from tests.router.conftest import MAX_MODEL_LEN
from tests.router.fake_backend import reply_ids, reply_text, token_logprob
from tests.router.helpers import USER, chat


def post(client, **fields):
    r = client.post("/v1/chat/completions", json=chat(**fields))
    assert r.status_code == 200, r.text
    return r.json()


def templated(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def test_reply_and_template(client, fake, tokenizer):
    body = post(client, seed=4)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": reply_text(4)}
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    ids = templated(tokenizer, USER)
    assert fake.requests[0].token_ids == ids
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == len(reply_ids(tokenizer, 4)) + 1


def test_text_parts_and_developer_role(client, fake, tokenizer):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]}]
    post(client, messages=messages)
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    assert fake.requests[0].token_ids == templated(tokenizer, expected)


def test_omitted_max_tokens_fills_the_context(client, fake, tokenizer):
    post(client)
    assert fake.requests[0].params.max_tokens == MAX_MODEL_LEN - len(templated(tokenizer, USER))


def test_max_completion_tokens_wins_over_max_tokens(client, fake):
    post(client, max_completion_tokens=3, max_tokens=7)
    assert fake.requests[0].params.max_tokens == 3


def test_logprobs_chat_format(client, served_model, tokenizer):
    body = post(client, logprobs=True, top_logprobs=2, max_tokens=4, seed=6)
    content = body["choices"][0]["logprobs"]["content"]
    ids = reply_ids(tokenizer, 6)[:4]
    assert [c["token"] for c in content] == [served_model.token_text.display(i) for i in ids]
    assert [c["logprob"] for c in content] == [token_logprob(i) for i in range(4)]
    assert content[0]["bytes"] == list(tokenizer.decode([ids[0]]).encode())
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    assert set(content[0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}


def test_logprobs_without_top(client):
    body = post(client, logprobs=True, max_tokens=2)
    assert all(c["top_logprobs"] == [] for c in body["choices"][0]["logprobs"]["content"])


def test_response_format_text_and_empty_tools_are_fine(client):
    post(client, response_format={"type": "text"}, tools=[], tool_choice="none", max_tokens=2)


def test_continue_final_message(client, fake, tokenizer):
    messages = USER + [{"role": "assistant", "content": "Hello"}]
    post(client, messages=messages, add_generation_prompt=False, continue_final_message=True,
         max_tokens=2)
    prompt = tokenizer.decode(fake.requests[0].token_ids)
    assert prompt.endswith("<|im_start|>assistant\nHello")
