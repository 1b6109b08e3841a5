"""Structured output against real stacks, as a new user would drive them: the OpenAI SDK's
`.parse()` with a pydantic model, a tool-call round trip, LangChain's with_structured_output,
and corpus schemas that validate on the disaggregated (1P+1D) and the colocated stack."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.e2e.stack import Stack
from tests.structured_corpus import MAX_TOKENS, corpus

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SAMPLE = 24  # corpus schemas per stack here; scripts/bench_structured.py runs all 200
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


class Person(BaseModel):
    name: str
    age: int


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("colocated"), "--colocated") as s:
        yield s


def test_sdk_parse_returns_the_pydantic_model(stack):
    r = client(stack).chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person, temperature=0, max_tokens=64)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and person.name


def test_tool_call_round_trip(stack):
    c = client(stack)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                      tool_choice="required", temperature=0, max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"}]
    second = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                       temperature=0, max_tokens=32)
    assert second.choices[0].message.content or second.choices[0].message.tool_calls
    # the call and the tool's answer were part of the second prompt
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(stack, method):
    llm = ChatOpenAI(model=MODEL, base_url=f"{stack.url}/v1", api_key="unused",
                     temperature=0, max_tokens=64, max_retries=0)
    person = llm.with_structured_output(Person, method=method).invoke("Invent a person.")
    assert isinstance(person, Person) and person.name


def corpus_answers(stack: Stack) -> list[tuple[dict, str, str]]:
    """(schema, finish_reason, text) for SAMPLE corpus schemas, greedy and seeded."""
    schemas = corpus()[:SAMPLE]

    def one(job: tuple[int, dict, float]) -> tuple[dict, str, str]:
        i, schema, temperature = job
        r = httpx.post(f"{stack.url}/v1/chat/completions", timeout=300, json={
            "model": MODEL, "max_tokens": MAX_TOKENS, "temperature": temperature, "seed": i,
            "messages": [{"role": "user", "content": "Fill in this JSON object."}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": f"s{i}", "schema": schema}}})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return schema, choice["finish_reason"], choice["message"]["content"]

    jobs = [(i, s, t) for i, s in enumerate(schemas) for t in (0.0, 1.0)]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, jobs))


@pytest.mark.parametrize("which", ["stack", "colocated"])
def test_corpus_answers_validate(request, which):
    for schema, reason, text in corpus_answers(request.getfixturevalue(which)):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
