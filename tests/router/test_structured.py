"""Structured output and tools at the router: every request form becomes the one guide the
engine runs (or a 400 naming the field), tool turns reach the template, and answers come back
as OpenAI's tool_calls, whole or streamed."""

from __future__ import annotations

import json

import pytest

from engine.sampling_params import Guide
from router.output.tool_calls import ToolCallStream, parse_answer
from router.protocol.structured import MAX_GUIDE_CHARS, regex_escape
from tests.router.fake_backend import script_from_ids
from tests.router.helpers import assert_envelope, chat, cmpl, sse_payloads

CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": SCHEMA}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def sent_guide(client, fake, path: str, body: dict) -> Guide | None:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return fake.requests[-1].params.guide


@pytest.mark.parametrize(("path", "body", "want"), [
    (CHAT, chat(response_format={"type": "json_schema",
                                 "json_schema": {"name": "c", "schema": SCHEMA, "strict": True}}),
     Guide("json", json.dumps(SCHEMA))),
    (CHAT, chat(response_format={"type": "json_object"}), Guide("json", '{"type": "object"}')),
    (CHAT, chat(response_format={"type": "text"}), None),
    (CMPL, cmpl(guided_json=SCHEMA), Guide("json", json.dumps(SCHEMA))),
    (CMPL, cmpl(guided_json=json.dumps(SCHEMA)), Guide("json", json.dumps(SCHEMA))),
    (CMPL, cmpl(guided_regex="[0-9]{3}"), Guide("regex", "[0-9]{3}")),
    (CMPL, cmpl(guided_choice=["a b", "c.d"]), Guide("regex", r"(a b|c\.d)")),
    (CMPL, cmpl(guided_grammar='start: "x" | "y"'), Guide("lark", 'start: "x" | "y"')),
    (CHAT, chat(structured_outputs={"choice": ["yes", "no"]}), Guide("regex", "(yes|no)")),
    (CHAT, chat(structured_outputs={"json_object": True}), Guide("json", '{"type": "object"}')),
])
def test_each_form_becomes_one_guide(client, fake, path, body, want):
    assert sent_guide(client, fake, path, {**body, "max_tokens": 2}) == want


def test_gbnf_is_read_as_lark(client, fake):
    guide = sent_guide(client, fake, CMPL, cmpl(guided_grammar='root ::= "yes" | "no"'))
    assert guide.kind == "lark" and '"yes"' in guide.spec and "::=" not in guide.spec


def test_choice_escaping_keeps_literals_literal():
    assert regex_escape("a+b (c)|d") == r"a\+b \(c\)\|d"


@pytest.mark.parametrize(("path", "body", "param", "code"), [
    (CHAT, chat(response_format={"type": "json_object"}, guided_regex="x"), "guided_regex", None),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"not": {"type": "string"}}}}), "response_format", "invalid_guide"),
    (CMPL, cmpl(guided_regex="("), "guided_regex", "invalid_guide"),
    (CMPL, cmpl(guided_json="[1, 2]"), "guided_json", None),
    (CMPL, cmpl(guided_json={"description": "x" * MAX_GUIDE_CHARS}), "guided_json", None),
    (CMPL, cmpl(guided_choice=[]), "guided_choice", None),
    (CHAT, chat(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs", None),
    (CHAT, chat(structured_outputs={"structural_tag": "x"}), "structured_outputs.structural_tag",
     None),
    (CHAT, chat(response_format={"type": "xml"}), "response_format.type", None),
    (CHAT, chat(response_format={"type": "json_schema"}), "response_format.json_schema", None),
    (CHAT, chat(tool_choice="required"), "tool_choice", None),
    (CHAT, chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice", None),
    (CHAT, chat(tools=[WEATHER], tool_choice="required", guided_regex="x"), "tool_choice", None),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "bad name"}}]),
     "tools.0.function.name", None),
])
def test_bad_constraints_are_400s_naming_the_field(client, fake, path, body, param, code):
    assert_envelope(client.post(path, json=body), 400, param, code)
    assert not fake.requests


def test_required_constrains_to_a_list_of_calls(client, fake):
    guide = sent_guide(client, fake, CHAT, chat(tools=[WEATHER, TIME], tool_choice="required"))
    schema = json.loads(guide.spec)
    assert schema["type"] == "array" and schema["minItems"] == 1
    names = [c["properties"]["name"]["const"] for c in schema["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]


def test_named_function_constrains_to_its_parameters(client, fake):
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert sent_guide(client, fake, CHAT, chat(tools=[WEATHER], tool_choice=named)) == Guide(
        "json", json.dumps(SCHEMA))


def reply(fake, text: str) -> None:
    ids = fake.tokenizer.encode(text, add_special_tokens=False)
    fake.script = lambda req: script_from_ids(ids, req, len(fake.tokenizer), fake.eos)


def test_tools_and_tool_turns_reach_the_prompt(client, fake, tokenizer):
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{
                   "id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"}]
    r = client.post(CHAT, json=chat(messages=history, tools=[WEATHER], max_tokens=2))
    assert r.status_code == 200, r.text
    prompt = tokenizer.decode(fake.requests[-1].token_ids)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\n18C, sunny\n</tool_response>" in prompt
    assert fake.requests[-1].params.guide is None  # auto: the model is free


def test_tool_choice_none_offers_no_tools(client, fake, tokenizer):
    client.post(CHAT, json=chat(tools=[WEATHER], tool_choice="none", max_tokens=2))
    assert "<tools>" not in tokenizer.decode(fake.requests[-1].token_ids)


def test_auto_answer_with_a_call_is_returned_as_tool_calls(client, fake):
    reply(fake, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
          '{"city": "Paris"}}\n</tool_call>')
    r = client.post(CHAT, json=chat(tools=[WEATHER]))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["id"].startswith("call_") and call["type"] == "function"


def test_auto_answer_without_a_call_is_plain_content(client, fake):
    reply(fake, "It is sunny.")
    choice = client.post(CHAT, json=chat(tools=[WEATHER])).json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["finish_reason"] == "stop"


def test_named_call_streams_its_arguments(client, fake):
    reply(fake, '{"city": "Paris"}')
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.post(CHAT, json=chat(tools=[WEATHER], tool_choice=named, stream=True))
    chunks = [p for p in sse_payloads(r.text) if p != "[DONE]"]
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"]["name"] == "get_weather"
    assert all("id" not in d for d in deltas[1:])
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # forced: OpenAI says stop
    assert all(c["choices"][0]["delta"].get("content") is None for c in chunks[1:])


def test_auto_stream_sends_text_then_the_call(client, fake):
    reply(fake, 'Sure. <tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    r = client.post(CHAT, json=chat(tools=[TIME], stream=True))
    chunks = [p for p in sse_payloads(r.text) if p != "[DONE]"]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    calls = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert content == "Sure. "
    assert [(d["function"]["name"], d["function"]["arguments"]) for d in calls] == [
        ("get_time", "{}")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_holds_back_a_split_tag_only_while_it_may_be_one():
    s = ToolCallStream("auto")
    assert s.feed("a <tool") == ("a ", [])
    assert s.feed("box>") == ("<toolbox>", [])  # not a tag after all: released
    assert s.feed(" <tool_") == (" ", [])
    assert s.feed('call>{"name": "f", "arguments": {"x": 1}}') == ("", [])
    content, calls = s.finish()
    assert content == "" and calls[0].function.arguments == '{"x": 1}'


@pytest.mark.parametrize(("mode", "text", "content", "calls"), [
    ("required", '[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"a": 1}}]', None,
     [("f", "{}"), ("g", '{"a": 1}')]),
    ("required", '[{"name": "f", "argu', '[{"name": "f", "argu', []),  # cut by max_tokens
    ("f", '{"a": 1}', None, [("f", '{"a": 1}')]),
    ("auto", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("auto", 'x <tool_call>[{"name": "f", "arguments": {}}]', "x", [("f", "{}")]),
])
def test_parse_answer(mode, text, content, calls):
    parsed = parse_answer(mode, text)
    assert parsed.content == content
    assert [(c.function.name, c.function.arguments) for c in parsed.calls] == calls


def test_a_schema_nested_past_the_recursion_limit_is_a_400(client, fake):
    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    assert_envelope(client.post(CMPL, json=cmpl(guided_json=deep)), 400, "guided_json")
