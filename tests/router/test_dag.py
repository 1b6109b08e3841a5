"""POST /v1/dag over a scripted backend: order, templating, concurrency, errors that name the
node, fail_fast and continue, and the event stream."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from engine.sequence import TokenEvent
from router.dispatch.backend import BackendUnavailable, GenerateRequest
from tests.router.conftest import MODEL
from tests.router.fake_backend import script_from_ids
from tests.router.helpers import assert_envelope, sse_payloads


@pytest.fixture
def echo(fake, tokenizer):
    """Replies `[<the prompt>]`, so a child's reply shows what its parent gave it; a prompt
    holding "boom" fails in the backend."""
    def script(req: GenerateRequest) -> list[TokenEvent]:
        prompt = tokenizer.decode(req.token_ids)
        if "boom" in prompt:
            raise BackendUnavailable("boom")
        ids = tokenizer.encode(f"[{prompt}]", add_special_tokens=False)
        return script_from_ids(ids, req, len(tokenizer), fake.eos)

    fake.script = script
    return fake


def node(id: str, prompt: str, **fields) -> dict:
    return {"id": id, "prompt": prompt, "max_tokens": 64, **fields}


def dag(*nodes: dict, **fields) -> dict:
    return {"nodes": list(nodes), **fields}


def by_id(body: dict) -> dict[str, dict]:
    return {n["id"]: n for n in body["nodes"]}


def test_children_see_their_parents_output(client, echo):
    r = client.post("/v1/dag", json=dag(
        node("c", "C sees {{b}}"), node("a", "root"), node("b", "B sees {{a}}"),
        node("d", "alone")))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [n["id"] for n in body["nodes"]] == ["c", "a", "b", "d"]  # the request's order
    got = by_id(body)
    assert got["a"]["text"] == "[root]"
    assert got["b"]["text"] == "[B sees [root]]"
    assert got["c"]["text"] == "[C sees [B sees [root]]]"
    assert {n["status"] for n in body["nodes"]} == {"done"}
    assert body["usage"]["completion_tokens"] == sum(
        n["usage"]["completion_tokens"] for n in body["nodes"])
    assert all(n["timings"]["total_s"] >= 0 and n["model"] == MODEL for n in body["nodes"])
    # c ran after b ended, which ran after a ended
    assert got["b"]["timings"]["started_s"] >= got["a"]["timings"]["started_s"]
    order = [req.request_id.split("-")[2] for req in echo.requests]  # dag-<hex>-<id>-0
    assert order.index("a") < order.index("b") < order.index("c")


def test_quadruple_braces_are_not_an_escape(client, echo):
    r = client.post("/v1/dag", json=dag(
        node("secret", "s3cret"), node("a", "{{{{secret}}}}", depends_on=["secret"]),
        node("b", "got {{a}}")))
    assert_envelope(r, 400, param="nodes.1", code="invalid_template")  # "{{{{" is no reference


def test_literal_braces_in_an_output_stay_literal(client, fake, tokenizer):
    def script(req):
        prompt = tokenizer.decode(req.token_ids)
        text = "{{b}} {{ 7*7 }}" if prompt == "first" else f"<{prompt}>"
        return script_from_ids(tokenizer.encode(text, add_special_tokens=False), req,
                               len(tokenizer), fake.eos)

    fake.script = script
    r = client.post("/v1/dag", json=dag(node("a", "first"), node("b", "then {{a}}")))
    assert by_id(r.json())["b"]["text"] == "<then {{b}} {{ 7*7 }}>"


def test_chat_nodes_carry_a_parents_answer_as_a_turn(client, echo, tokenizer):
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{{a}}"},
            {"role": "user", "content": "more"}]
    r = client.post("/v1/dag", json=dag(node("a", "root"),
                                        {"id": "b", "messages": turn, "max_tokens": 400}))
    assert r.status_code == 200, r.text
    assert by_id(r.json())["b"]["status"] == "done"
    prompt = tokenizer.decode(echo.requests[-1].token_ids)  # b's, through the chat template
    assert "<|im_start|>assistant\n[root]<|im_end|>\n<|im_start|>user\nmore" in prompt


@pytest.mark.parametrize("limit, peak", [(None, 4), (2, 2), (1, 1)])
def test_independent_nodes_run_concurrently_up_to_the_bound(client, echo, limit, peak):
    echo.delay_s = 0.01
    nodes = [node(f"n{i}", f"p{i}") for i in range(4)]
    r = client.post("/v1/dag", json=dag(*nodes, max_concurrency=limit))
    assert r.status_code == 200, r.text
    assert echo.peak_active == peak


def test_the_server_bound_caps_a_request(make_app, echo):
    with TestClient(make_app(echo, dag_max_concurrency=2)) as c:
        r = c.post("/v1/dag", json=dag(*[node(f"n{i}", "x") for i in range(5)],
                                       max_concurrency=50))
    assert r.status_code == 200 and echo.peak_active == 2


@pytest.mark.parametrize("nodes, code, param, name", [
    ([node("a", "{{b}}"), node("b", "{{a}}")], "cycle", "nodes.0", "'a'"),
    ([node("a", "x", depends_on=["a"])], "self_dependency", "nodes.0", "'a'"),
    ([node("a", "x"), node("b", "{{ghost}}")], "unknown_reference", "nodes.1", "'b'"),
    ([node("a", "x"), node("b", "x", depends_on=["ghost"])], "unknown_reference", "nodes.1",
     "'b'"),
    ([node("a", "x", model="no-such-model")], "model_not_found", "nodes.0", "'a'"),
    ([node("a", "x"), node("a", "y")], "duplicate_node", "nodes.1", "'a'"),
    ([node("a", "{{ 7*7 }}")], "invalid_template", "nodes.0", "'a'"),
    ([node("a", "x"), node("b", "{{ a.__class__.__mro__ }}")], "invalid_template", "nodes.1",
     "'b'"),
    ([node("a", "{% import os %}")], "invalid_template", "nodes.0", "'a'"),
    ([node("a", "{{ self._TemplateReference__context }}")], "invalid_template", "nodes.0",
     "'a'"),
    ([node("a b", "x")], "invalid_node_id", "nodes.0", "'a b'"),
    ([{"id": "a", "max_tokens": 4}], "invalid_node", "nodes.0", "'a'"),
])
def test_bad_dags_are_400s_that_name_the_node(client, echo, nodes, code, param, name):
    r = client.post("/v1/dag", json=dag(*nodes))
    assert_envelope(r, 400, param=param, code=code)
    assert f"node {name}" in r.json()["error"]["message"]
    assert echo.requests == []  # nothing ran


def test_more_nodes_than_the_limit(client, echo):
    r = client.post("/v1/dag", json=dag(*[node(f"n{i}", "x") for i in range(51)]))
    assert_envelope(r, 400, param="nodes.50", code="too_many_nodes")
    assert "node 'n50'" in r.json()["error"]["message"]
    assert echo.requests == []


@pytest.mark.parametrize("body, param", [
    (dag(node("a", "x", dependson=["b"])), "nodes.0.dependson"),  # a misspelt field
    (dag(node("a", "x", temperature=-1)), "nodes.0.temperature"),
    (dag(node("a", "x"), on_error="ignore"), "on_error"),
    ({"nodes": []}, "nodes"),
    ({"nodes": "a"}, "nodes"),
])
def test_malformed_bodies_are_400s(client, echo, body, param):
    assert_envelope(client.post("/v1/dag", json=body), 400, param=param)


def test_a_node_whose_prompt_outgrows_the_context_fails_alone(client, echo):
    # max_model_len is 512: "{{a}}" six times over a ~100-token answer no longer fits.
    long = "word " * 90
    r = client.post("/v1/dag", json=dag(
        node("a", long, max_tokens=200), node("b", "{{a}}" * 6, max_tokens=4),
        node("c", "fine"), on_error="continue"))
    got = by_id(r.json())
    assert got["b"]["status"] == "failed"
    assert got["b"]["error"]["code"] == "context_length_exceeded"
    assert got["a"]["status"] == got["c"]["status"] == "done"


def test_a_prompt_that_would_outgrow_the_text_limit_fails_before_it_is_built(make_app, echo):
    with TestClient(make_app(echo, max_text_chars=2000)) as c:
        r = c.post("/v1/dag", json=dag(node("a", "word " * 50, max_tokens=100),
                                       node("b", "{{a}}" * 300), on_error="continue"))
    got = by_id(r.json())
    assert got["a"]["status"] == "done"
    assert got["b"]["status"] == "failed"
    assert got["b"]["error"]["code"] == "string_above_max_length"
    assert got["b"]["error"]["param"] == "prompt"


def test_continue_skips_only_descendants(client, echo):
    r = client.post("/v1/dag", json=dag(
        node("bad", "boom"), node("child", "{{bad}}"), node("grandchild", "{{child}}"),
        node("ok", "fine"), on_error="continue"))
    assert r.status_code == 200
    got = by_id(r.json())
    assert got["bad"]["status"] == "failed" and got["bad"]["error"]["message"]
    assert got["child"]["status"] == got["grandchild"]["status"] == "skipped"
    assert got["ok"]["status"] == "done" and got["ok"]["text"] == "[fine]"


def test_fail_fast_cancels_what_runs_and_skips_the_rest(client, echo):
    echo.delay_s = 0.05  # "slow" is still running when "bad" fails
    r = client.post("/v1/dag", json=dag(
        node("slow", "x " * 40), node("bad", "boom"), node("later", "{{slow}}")))
    got = by_id(r.json())
    assert got["bad"]["status"] == "failed"
    assert got["slow"]["status"] == "cancelled"
    assert got["later"]["status"] == "skipped"
    assert any(rid.endswith("-slow-0") for rid in echo.closed)
    assert not any("-later-" in q.request_id for q in echo.requests)
    assert client.app.state.tandem.inflight.open == 0


def test_stream_events_per_node(client, echo):
    r = client.post("/v1/dag", json=dag(node("a", "root"), node("b", "{{a}}!"), stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    kinds = [(e["type"], e.get("id")) for e in events[:-1]]
    assert kinds[0] == ("node.started", "a")
    assert kinds.index(("node.done", "a")) < kinds.index(("node.started", "b"))
    assert kinds[-1] == ("dag.done", None)
    text_b = "".join(e["delta"] for e in events[:-1] if e["type"] == "node.delta"
                     and e["id"] == "b")
    assert text_b == "[[root]!]"
    final = by_id(events[-2]["dag"])
    assert final["b"]["text"] == text_b


def test_stream_reports_node_errors_as_events(client, echo):
    r = client.post("/v1/dag", json=dag(node("bad", "boom"), node("child", "{{bad}}"),
                                        stream=True, on_error="continue"))
    events = [e for e in sse_payloads(r.text) if e != "[DONE]"]
    errors = {e["id"]: e["node"]["status"] for e in events if e["type"] == "node.error"}
    assert errors == {"bad": "failed", "child": "skipped"}


def test_dag_is_in_openapi(client):
    spec = client.get("/openapi.json").json()
    assert "/v1/dag" in spec["paths"]
    assert "DagRequest" in spec["components"]["schemas"]


def test_a_node_can_be_structured(client, fake):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    r = client.post("/v1/dag", json=dag(
        node("a", "pick", guided_choice=["yes", "no"]),
        node("b", "json", response_format={"type": "json_schema",
                                           "json_schema": {"name": "s", "schema": schema}})))
    assert r.status_code == 200, r.text
    guides = {req.params.guide.kind for req in fake.requests}
    assert guides == {"regex", "json"}
    bad = client.post("/v1/dag", json=dag(node("a", "x", guided_regex="(")))
    assert bad.json()["nodes"][0]["error"]["param"] == "guided_regex"
