"""The router's /metrics over a scripted backend: counts equal the usage the client was billed
(echo, stop strings, n > 1, streams), refusals count only as HTTP, and the names lint clean."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from router.dispatch.backend import BackendUnavailable
from router.metrics import RouterMetrics
from router.service import create_metered_app
from router.settings import RouterSettings
from tests.router.conftest import MODEL
from tests.router.helpers import chat, cmpl
from tests.router.test_metrics_lint import lint_exposition


@pytest.fixture
def metered(served_model, fake) -> Iterator[TestClient]:
    app = create_metered_app(RouterSettings(_env_file=None), fake, RouterMetrics.create(),
                             models=[served_model])
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def sample(client: TestClient, name: str, **labels: str) -> float:
    """The value of one series (0.0 if absent)."""
    text = client.get("/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def tokens(client: TestClient) -> tuple[float, float, float, float]:
    """(prompt, generation, cache queries, cache hits) counters for the model."""
    return tuple(sample(client, f"tandem:{n}_total", model_name=MODEL) for n in (
        "prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits"))


def successes(client: TestClient, reason: str) -> float:
    return sample(client, "tandem:request_success_total", model_name=MODEL,
                  finished_reason=reason)


def test_counters_equal_billed_usage(metered):
    usages = [metered.post("/v1/chat/completions", json=chat(max_tokens=4, seed=1)).json(),
              metered.post("/v1/completions", json=cmpl(n=2, max_tokens=100, seed=2)).json()]
    prompt = sum(u["usage"]["prompt_tokens"] for u in usages)
    generated = sum(u["usage"]["completion_tokens"] for u in usages)
    cached = sum(u["usage"]["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert tokens(metered) == (prompt, generated, prompt, cached)
    assert successes(metered, "length") == 1 and successes(metered, "stop") == 2
    assert sample(metered, "tandem:request_prompt_tokens_count", model_name=MODEL) == 2
    assert sample(metered, "tandem:time_to_first_token_seconds_count", model_name=MODEL) == 3


def test_echo_with_max_tokens_zero_generates_nothing(metered, fake):
    body = metered.post("/v1/completions", json=cmpl(echo=True, max_tokens=0)).json()
    assert fake.played  # the backend ran one token, which the API layer dropped
    assert body["usage"]["completion_tokens"] == 0
    assert tokens(metered)[:2] == (body["usage"]["prompt_tokens"], 0)
    assert successes(metered, "length") == 1


def test_stop_string_counts_as_stop(metered):
    body = metered.post("/v1/completions", json=cmpl(seed=5, max_tokens=100, stop=["ld!"]))
    assert body.json()["choices"][0]["finish_reason"] == "stop"
    assert successes(metered, "stop") == 1 and successes(metered, "abort") == 0
    assert tokens(metered)[1] == body.json()["usage"]["completion_tokens"]


def test_stream_counts_like_its_final_usage(metered):
    with metered.stream("POST", "/v1/chat/completions", json=chat(
            stream=True, max_tokens=5, seed=3, stream_options={"include_usage": True})) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    usage = json.loads(lines[-1][len("data: "):])["usage"]
    assert tokens(metered)[:2] == (usage["prompt_tokens"], usage["completion_tokens"])


def test_refused_request_counts_only_as_http(metered, fake):
    fake.fail_before = BackendUnavailable("no workers")
    assert metered.post("/v1/chat/completions", json=chat()).status_code == 503
    assert tokens(metered) == (0, 0, 0, 0)
    assert sample(metered, "tandem:http_requests_total", route="/v1/chat/completions",
                  method="POST", status="503") == 1
    assert sample(metered, "tandem:router_requests_in_flight", model_name=MODEL) == 0


def test_one_log_line_per_request(metered, caplog):
    with caplog.at_level(logging.INFO, logger="tandem.requests"):
        body = metered.post("/v1/completions", json=cmpl(max_tokens=3, seed=1)).json()
    [line] = [r.getMessage() for r in caplog.records if r.name == "tandem.requests"]
    u = body["usage"]
    assert line.startswith(f"request {body['id']} model={MODEL} prompt={u['prompt_tokens']} "
                           f"cached={u['prompt_tokens_details']['cached_tokens']} "
                           f"generated={u['completion_tokens']} ttft=")
    assert line.endswith("finish=length") and " total=" in line


def test_exposition_lints_clean(metered):
    metered.post("/v1/chat/completions", json=chat(max_tokens=2))
    metered.get("/nope")
    assert lint_exposition(metered.get("/metrics").text) == []
    assert sample(metered, "tandem:http_requests_total", route="unmatched", status="404") == 1
