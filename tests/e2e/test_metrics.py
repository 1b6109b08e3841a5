"""Observability end to end on a real `tandem serve`: every service's /metrics lints clean, a
scripted run leaves exact counters, and the Grafana dashboard queries only metrics that exist."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.stack import Stack
from tests.router.test_metrics_lint import family_names, lint_exposition

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DASHBOARD = Path(__file__).resolve().parents[2] / "configs/grafana/dashboards/tandem.json"
# Series Prometheus makes itself rather than scraping them.
SYNTHETIC = {"up"}
# ~600 tokens of system prompt: more than 4 blocks of 64 shared by the two long requests.
DOCUMENT = " ".join(f"Clause {i}: the tenant keeps the garden tidy." for i in range(60))
ROUTER_FAMILIES = {
    "tandem:time_to_first_token_seconds", "tandem:inter_token_latency_seconds",
    "tandem:e2e_request_latency_seconds", "tandem:request_prefill_time_seconds",
    "tandem:request_decode_time_seconds", "tandem:request_prompt_tokens",
    "tandem:request_generation_tokens", "tandem:prompt_tokens", "tandem:generation_tokens",
    "tandem:request_success", "tandem:prefix_cache_queries", "tandem:prefix_cache_hits",
    "tandem:worker_up", "tandem:worker_inflight_requests", "tandem:worker_failovers",
    "tandem:http_requests",
}
WORKER_FAMILIES = {
    "tandem:num_requests_running", "tandem:num_requests_waiting", "tandem:kv_slots_usage_perc",
    "tandem:request_queue_time_seconds", "tandem:kvstore_get_seconds",
    "tandem:kvstore_put_seconds", "tandem:kvstore_bytes", "tandem:kvstore_hits",
    "tandem:kvstore_misses", "tandem:kvstore_corrupt_blocks", "tandem:kvstore_tier_up",
    "tandem:kv_handoff_bytes", "tandem:kv_handoff_seconds", "tandem:http_requests",
    "tandem:kv_cache_usage_perc", "tandem:kv_pages_capacity", "tandem:kv_pages_used",
    "tandem:kv_pages_cached", "tandem:num_preemptions", "tandem:prefix_cache_device_tokens",
    "tandem:prefix_cache_store_tokens", "tandem:guide_compiles", "tandem:guide_cache_hits",
}


def scrape(url: str) -> str:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return r.text


def service_urls(stack: Stack) -> dict[str, str]:
    urls = {"router": stack.url}
    for w in stack.workers():
        urls.setdefault(w["role"], w["url"])
    return urls


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def post(stack: Stack, path: str, body: dict) -> dict:
    r = httpx.post(f"{stack.url}{path}", json={"model": MODEL, **body}, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def stream_usage(stack: Stack, body: dict) -> dict:
    """A streamed chat; returns the final chunk (usage + the finish reason seen)."""
    finish, usage = None, None
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", timeout=180, json={
            "model": MODEL, "stream": True, "stream_options": {"include_usage": True}, **body,
    }) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                usage = chunk.get("usage") or usage
                for c in chunk["choices"]:
                    finish = c.get("finish_reason") or finish
    return {"usage": usage, "choices": [{"finish_reason": finish}]}


def long_chat(question: str) -> dict:
    return {"messages": [{"role": "system", "content": DOCUMENT},
                         {"role": "user", "content": question}],
            "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def scripted(stack) -> list[dict]:
    """The known requests, in order; each item is the response body (usage + choices)."""
    short = [{"role": "user", "content": "Name a colour."}]
    return [
        post(stack, "/v1/chat/completions", {"messages": short, "max_tokens": 6,
                                             "temperature": 0}),
        post(stack, "/v1/completions", {"prompt": "Echo me", "echo": True, "max_tokens": 0}),
        post(stack, "/v1/completions", {"prompt": "One, two,", "max_tokens": 5, "n": 2,
                                        "seed": 1}),
        stream_usage(stack, {"messages": short, "max_tokens": 3, "temperature": 0}),
        post(stack, "/v1/chat/completions", long_chat("Who keeps the garden?")),
        post(stack, "/v1/chat/completions", long_chat("Summarise clause 3.")),
    ]


@pytest.mark.parametrize("service", ["router", "prefill", "decode"])
def test_metrics_parse_and_lint_clean(stack, scripted, service):
    text = scrape(service_urls(stack)[service])
    assert lint_exposition(text) == []
    want = ROUTER_FAMILIES if service == "router" else WORKER_FAMILIES
    assert want <= {f.name for f in text_string_to_metric_families(text)}


def test_counters_hold_exact_values_after_a_scripted_run(stack, scripted):
    text = scrape(stack.url)
    usage = [r["usage"] for r in scripted]
    m = {"model_name": MODEL}
    assert value(text, "tandem:prompt_tokens_total", **m) == sum(u["prompt_tokens"] for u in usage)
    assert value(text, "tandem:generation_tokens_total", **m) == sum(
        u["completion_tokens"] for u in usage)
    assert scripted[1]["usage"]["completion_tokens"] == 0  # the echo generated nothing
    reasons = Counter(c["finish_reason"] for r in scripted for c in r["choices"])
    for reason, count in reasons.items():
        assert value(text, "tandem:request_success_total", finished_reason=reason, **m) == count
    assert value(text, "tandem:request_success_total", **m) == sum(reasons.values())
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usage]
    assert cached[-1] >= 4 * 64, cached  # the second long prompt reused >= 4 blocks
    assert value(text, "tandem:prefix_cache_hits_total", **m) == sum(cached)
    assert value(text, "tandem:prefix_cache_queries_total", **m) == sum(
        u["prompt_tokens"] for u in usage)
    assert value(text, "tandem:http_requests_total", route="/v1/chat/completions",
                 status="200") == 4


def test_workers_measure_queue_time_and_handoff(stack, scripted):
    urls = service_urls(stack)
    decode, prefill = scrape(urls["decode"]), scrape(urls["prefill"])
    # Every choice queues on the decode worker once; the first long prompt also on prefill.
    assert value(decode, "tandem:request_queue_time_seconds_count") >= len(scripted)
    assert value(prefill, "tandem:request_queue_time_seconds_count") >= 1
    assert value(prefill, "tandem:kv_handoff_bytes_count", op="store") >= 1
    assert value(decode, "tandem:kv_handoff_bytes_count", op="load") >= 1
    for text in (decode, prefill):
        assert value(text, "tandem:kvstore_tier_up", tier="memory") == 1
        assert value(text, "tandem:kv_pages_capacity") > 0
        assert 0 <= value(text, "tandem:kv_cache_usage_perc") <= 1
        assert value(text, "tandem:num_preemptions_total") == 0  # six short requests fit
    # The second long prompt's prefix came from the store, on whichever worker loaded it.
    assert value(decode, "tandem:kvstore_hits_total") + value(prefill, "tandem:kvstore_hits_total")
    reused = sum(value(text, f"tandem:prefix_cache_{where}_tokens_total")
                 for text in (decode, prefill) for where in ("device", "store"))
    assert reused >= 4 * 64  # the engines saw it too (from their pool or the store)


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return exprs


def queried_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: `ns:name` tokens, and bare names before a `{`."""
    names = set(re.findall(r"\b[a-zA-Z_]\w*:[\w:]+", expr))
    names |= {n for n in re.findall(r"(?<![\w:])([a-zA-Z_]\w*)\{", expr) if ":" not in n}
    return names


def test_dashboard_queries_only_existing_metrics(stack, scripted):
    exprs = dashboard_queries()
    assert len(exprs) >= 20
    exposed = set(SYNTHETIC)
    for url in service_urls(stack).values():
        exposed |= family_names(scrape(url))
    queried = set().union(*map(queried_metrics, exprs))
    assert "tandem:time_to_first_token_seconds_bucket" in queried
    assert queried <= exposed, sorted(queried - exposed)
