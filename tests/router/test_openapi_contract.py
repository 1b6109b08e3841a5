"""/openapi.json is the contract: for every operation, bodies the document allows are accepted
and answered as documented; bodies it forbids are refused with 400. Also: the bearer scheme
and the 401s appear exactly when API keys are set.

Examples are hand-picked per operation and checked against the document itself (jsonschema),
so a test fails if the document and the server disagree in either direction."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from router.api import ops as routes_ops
from router.metrics import RouterMetrics
from router.service import create_metered_app
from router.settings import RouterSettings
from tests.router.conftest import MODEL
from tests.router.fake_backend import FakeBackend

USER = {"role": "user", "content": "Say hello."}
Body = dict[str, Any]


@pytest.fixture(scope="module")
def api(served_model) -> Iterator[tuple[TestClient, dict[str, Any], int]]:
    app = create_metered_app(RouterSettings(_env_file=None), FakeBackend(served_model.tokenizer),
                             RouterMetrics.create(), models=[served_model],
                             extra_routers=[routes_ops.routes])
    with TestClient(app) as c:
        yield c, c.get("/openapi.json").json(), served_model.vocab_size


def _validator(spec: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    # The document's components ride along so "#/components/schemas/..." refs resolve.
    return Draft202012Validator({**schema, "components": spec["components"]})


def _request_schema(spec: dict[str, Any], path: str) -> Draft202012Validator:
    body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return _validator(spec, body["schema"])


def _response_schema(spec: dict[str, Any], path: str, method: str) -> Draft202012Validator:
    ok = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]
    return _validator(spec, ok["schema"])


def valid_bodies(vocab: int) -> dict[str, list[Body]]:
    return {
        "/v1/completions": [
            {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4},
            {"model": MODEL, "prompt": [1, 2, vocab - 1], "max_tokens": 2,
             "logit_bias": {str(vocab - 1): -100}, "suffix": None},
            {"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 2, "top_k": -1,
             "stop_token_ids": [0]},
        ],
        "/v1/chat/completions": [
            {"model": MODEL, "messages": [USER], "max_tokens": 4},
            # Only an assistant turn may omit content.
            {"model": MODEL, "messages": [USER, {"role": "assistant"}, USER], "tools": []},
            {"model": MODEL, "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "assistant", "content": None}, USER], "tool_choice": "none"},
        ],
        "/tokenize": [
            {"prompt": "hello"},
            {"model": None, "prompt": "hello", "return_token_strs": True},
            {"model": MODEL, "messages": [USER, {"role": "assistant"}]},
        ],
        "/detokenize": [
            {"tokens": [1, 2, 3]},
            {"model": None, "tokens": []},
            {"model": MODEL, "tokens": [vocab - 1]},
        ],
    }


def invalid_bodies(vocab: int) -> dict[str, list[Body]]:
    return {
        "/v1/completions": [
            {"prompt": "x"},
            {"model": "", "prompt": "x"},
            {"model": None, "prompt": "x"},
            {"model": MODEL, "prompt": [vocab]},
            {"model": MODEL, "prompt": [-1]},
            {"model": MODEL, "prompt": "x", "suffix": "tail"},
            {"model": MODEL, "prompt": "x", "logit_bias": {"-0": 1}},
            {"model": MODEL, "prompt": "x", "stop_token_ids": [vocab]},
            {"model": MODEL, "prompt": "x", "temperature": 3},
        ],
        "/v1/chat/completions": [
            {"model": MODEL, "messages": [{"role": "user"}]},
            {"model": MODEL, "messages": [{"role": "system", "content": None}]},
            {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
            {"model": MODEL, "messages": [{"content": "x"}]},
            {"model": MODEL, "messages": [USER], "tools": [{"type": "function"}]},
            {"model": "", "messages": [USER]},
            {"model": MODEL, "messages": []},
        ],
        "/tokenize": [
            {"model": MODEL},
            {"prompt": 5},
            {"model": "", "prompt": "x"},
            {"messages": [{"role": "user"}]},
            {"prompt": "x", "messages": [{"role": "user"}]},
        ],
        "/detokenize": [
            {"model": MODEL},
            {"tokens": [vocab]},
            {"tokens": [-1]},
            {"tokens": "1 2"},
            {"model": "", "tokens": [1]},
        ],
    }


def test_allowed_bodies_are_accepted_and_answered_as_documented(api):
    client, spec, vocab = api
    for path, bodies in valid_bodies(vocab).items():
        request, response = _request_schema(spec, path), _response_schema(spec, path, "post")
        for body in bodies:
            request.validate(body)
            r = client.post(path, json=body)
            assert r.status_code == 200, (path, body, r.text)
            response.validate(r.json())


def test_forbidden_bodies_are_refused_with_400(api):
    client, spec, vocab = api
    for path, bodies in invalid_bodies(vocab).items():
        request = _request_schema(spec, path)
        for body in bodies:
            assert not request.is_valid(body), (path, body)
            r = client.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            assert "400" in spec["paths"][path]["post"]["responses"]


def test_get_operations_answer_as_documented(api):
    client, spec, _ = api
    for path in ("/health", "/v1/models", f"/v1/models/{MODEL}", "/tokenizer_info"):
        template = "/v1/models/{model}" if path.startswith("/v1/models/") else path
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        _response_schema(spec, template, "get").validate(r.json())
    assert client.get("/health").json() == {"status": "ok"}
    for path in ("/ready", "/workers"):
        assert client.get(path).status_code == 200 and path in spec["paths"]


def test_a_dag_answers_as_documented(api):
    client, spec, _ = api
    body = {"nodes": [{"id": "a", "prompt": "Once"}, {"id": "b", "prompt": "{{a}} more"},
                      {"id": "c", "prompt": "boom", "max_tokens": 9999}], "on_error": "continue"}
    r = client.post("/v1/dag", json=body)
    assert r.status_code == 200, r.text
    _response_schema(spec, "/v1/dag", "post").validate(r.json())
    assert [n["status"] for n in r.json()["nodes"]] == ["done", "done", "failed"]


def test_the_document_covers_every_operation_and_never_422(api):
    _, spec, _ = api
    ops = [(p, m) for p, item in spec["paths"].items() for m in item]
    assert len(ops) == 11, ops
    for path, method in ops:
        assert "422" not in spec["paths"][path][method]["responses"], path


def _auth_parts(spec: dict[str, Any]) -> tuple[bool, set[str], set[str]]:
    schemes = "securitySchemes" in spec.get("components", {})
    secured, with_401 = set(), set()
    for path, item in spec["paths"].items():
        for op in item.values():
            if op.get("security"):
                secured.add(path)
            if "401" in op["responses"]:
                with_401.add(path)
    return schemes, secured, with_401


@pytest.mark.parametrize("keys", [[], ["sk-one"]])
def test_security_is_declared_exactly_when_keys_are_set(served_model, fake, keys):
    app = create_metered_app(RouterSettings(_env_file=None, api_keys=keys), fake,
                             RouterMetrics.create(), models=[served_model],
                             extra_routers=[routes_ops.routes])
    headers = {"Authorization": "Bearer sk-one"} if keys else {}
    with TestClient(app) as c:
        spec = c.get("/openapi.json", headers=headers).json()
        schemes, secured, with_401 = _auth_parts(spec)
        if not keys:
            assert (schemes, secured, with_401) == (False, set(), set())
            return
        open_paths = {"/health", "/ready"}
        assert schemes and secured == with_401 == set(spec["paths"]) - open_paths
        for path in secured:
            for method in spec["paths"][path]:
                assert c.request(method, path.replace("{model}", MODEL)).status_code == 401



def test_token_ids_drawn_from_the_documented_range_are_accepted(api):
    """Every id the document allows (its own minimum and maximum) detokenizes; one past it is
    refused, by the document and the server alike."""
    client, spec, _ = api
    item = spec["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]["items"]
    low, high = int(item["minimum"]), int(item["maximum"])
    request = _request_schema(spec, "/detokenize")

    @settings(max_examples=40, deadline=None, database=None)
    @given(st.lists(st.integers(low, high), max_size=16), st.sampled_from([None, MODEL]))
    def check(tokens: list[int], model: str | None) -> None:
        body = {"model": model, "tokens": tokens}
        request.validate(body)
        assert client.post("/detokenize", json=body).status_code == 200

    check()
    for bad in (low - 1, high + 1):
        assert not request.is_valid({"tokens": [bad]})
        assert client.post("/detokenize", json={"tokens": [bad]}).status_code == 400
