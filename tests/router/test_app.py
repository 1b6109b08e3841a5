"""App plumbing: health, auth, models, lifespan hooks, OpenAPI, timeouts."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.testclient import TestClient

from tests.router.conftest import MAX_MODEL_LEN, MODEL
from tests.router.helpers import chat, cmpl


def test_lifespan_starts_and_closes_the_backend(make_app, fake):
    with TestClient(make_app(fake)):
        assert fake.started and not fake.stopped
    assert fake.stopped


def test_extra_routers_hook(served_model, fake):
    from router.app import create_app
    from router.settings import RouterSettings

    extra = APIRouter()

    @extra.get("/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    app = create_app(RouterSettings(_env_file=None), fake, [served_model], extra_routers=[extra])
    with TestClient(app) as c:
        assert c.get("/ready").json() == {"status": "ready"}
        assert app.state.backend is fake


def test_health_is_open(make_app, fake):
    with TestClient(make_app(fake, api_keys=["sk-one"])) as c:
        assert c.get("/health").status_code == 200


def test_api_keys(make_app, fake):
    with TestClient(make_app(fake, api_keys=["sk-one", "sk-two"])) as c:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-one"}):
            r = c.post("/v1/completions", json=cmpl(), headers=headers)
            assert r.status_code == 401, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
            assert "sk-wrong" not in err["message"]  # never echo a key back whole
        for key in ("sk-one", "sk-two"):
            auth = {"Authorization": f"Bearer {key}"}
            assert c.post("/v1/chat/completions", json=chat(), headers=auth).status_code == 200
            assert c.get("/v1/models", headers=auth).status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401


def test_models(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == MODEL and card["object"] == "model"
    assert card["max_model_len"] == MAX_MODEL_LEN and isinstance(card["created"], int)
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_openapi_describes_constraints_and_sse(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    props = schemas["CompletionRequest"]["properties"]
    temp = next(s for s in props["temperature"]["anyOf"] if s.get("type") == "number")
    assert (temp["minimum"], temp["maximum"]) == (0, 2)
    n = next(s for s in props["n"]["anyOf"] if s.get("type") == "integer")
    assert (n["minimum"], n["maximum"]) == (1, 128)
    logprobs = next(s for s in props["logprobs"]["anyOf"] if s.get("type") == "integer")
    assert logprobs["maximum"] == 5
    assert list(props)[:3] == ["model", "prompt", "echo"]  # OpenAI's order
    chat_props = schemas["ChatCompletionRequest"]["properties"]
    assert chat_props["messages"]["minItems"] == 1
    for path in ("/v1/completions", "/v1/chat/completions"):
        op = spec["paths"][path]["post"]
        assert "text/event-stream" in op["responses"]["200"]["content"]
        assert "application/json" in op["responses"]["200"]["content"]
        assert "429" in op["responses"] and "400" in op["responses"]


def test_silent_backend_times_out(make_app, fake):
    fake.delay_s = 1.0
    with TestClient(make_app(fake, request_timeout_s=0.05)) as c:
        r = c.post("/v1/completions", json=cmpl())
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert fake.closed  # the backend iterator was closed, not leaked
