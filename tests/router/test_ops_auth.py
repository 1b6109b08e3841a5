"""Operator routes: with API keys set, /workers, /metrics and the API's documents
(/openapi.json, /docs, /redoc) need the key; the probes /health and /ready never do."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from router.api import ops as routes_ops
from router.metrics import RouterMetrics
from router.service import create_metered_app
from router.settings import RouterSettings

PROTECTED = ["/workers", "/metrics", "/openapi.json", "/docs", "/redoc"]
OPEN = ["/health", "/ready"]


@pytest.fixture
def ops_client(served_model, fake) -> Callable[..., TestClient]:
    def build(**settings) -> TestClient:
        app = create_metered_app(RouterSettings(_env_file=None, **settings), fake,
                                 RouterMetrics.create(), models=[served_model],
                                 extra_routers=[routes_ops.routes])
        return TestClient(app)

    return build


def test_with_keys_ops_routes_need_the_key(ops_client):
    with ops_client(api_keys=["ops:sk-ops"]) as c:
        for path in PROTECTED:
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer sk-ops"}).status_code == 200
        for path in OPEN:
            assert c.get(path).status_code == 200, path


def test_without_keys_everything_is_open(ops_client):
    with ops_client() as c:
        for path in PROTECTED + OPEN:
            assert c.get(path).status_code == 200, path
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/health").headers["content-type"] == "application/json"
        assert "swagger-ui" in c.get("/docs").text and "redoc" in c.get("/redoc").text
