"""A worker's /metrics: counters a tier keeps itself (evictions, disk full) are scraped from
the store's stats, per tier; engine load, KV pool occupancy and engine counters are read at
scrape time."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.config import EngineStats, KVUsage
from engine.grammar import GrammarStats
from engine.page_pool import PagePool
from tests.e2e.faults import poll
from tests.router.test_metrics_lint import lint_exposition
from tests.worker.apps import PROMPT, client, decode_body, params, worker_of
from worker.metrics import EngineCollector, EngineReading
from worker.runtime import WorkerCounters


def sample(text: str, name: str, tier: str) -> float:
    [line] = [ln for ln in text.splitlines() if ln.startswith(f"{name}{{")
              and f'tier="{tier}"' in ln]
    return float(line.rsplit(" ", 1)[1])


def samples(text: str) -> dict[str, float]:
    """name -> value of every sample labelled model_name="m"."""
    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.labels == {"model_name": "m"}}


def test_engine_collector_exports_pool_and_counters():
    stats = EngineStats(preemptions=2, prefix_device_tokens=48, prefix_store_tokens=64)
    reading = EngineReading(running=3, waiting=1, max_slots=4,
                            counters=WorkerCounters(requests_total=5),
                            kv=KVUsage(pages=40, used=10, cached=6, page_size=16), stats=stats,
                            grammar=GrammarStats(compiles=3, hits=7, compile_seconds=0.5))
    registry = CollectorRegistry()
    registry.register(EngineCollector("m", lambda: reading))
    text = generate_latest(registry).decode()
    assert lint_exposition(text) == []
    got = samples(text)
    assert {k: got[k] for k in (
        "tandem:num_requests_running", "tandem:num_requests_waiting",
        "tandem:kv_slots_usage_perc", "tandem:kv_cache_usage_perc", "tandem:kv_pages_capacity",
        "tandem:kv_pages_used", "tandem:kv_pages_cached", "tandem:num_preemptions_total",
        "tandem:prefix_cache_device_tokens_total", "tandem:prefix_cache_store_tokens_total",
        "tandem:worker_requests_total", "tandem:guide_compiles_total",
        "tandem:guide_cache_hits_total",
    )} == {
        "tandem:num_requests_running": 3, "tandem:num_requests_waiting": 1,
        "tandem:kv_slots_usage_perc": 0.75, "tandem:kv_cache_usage_perc": 0.25,
        "tandem:kv_pages_capacity": 40, "tandem:kv_pages_used": 10, "tandem:kv_pages_cached": 6,
        "tandem:num_preemptions_total": 2, "tandem:prefix_cache_device_tokens_total": 48,
        "tandem:prefix_cache_store_tokens_total": 64, "tandem:worker_requests_total": 5,
        "tandem:guide_compiles_total": 3, "tandem:guide_cache_hits_total": 7,
    }


def test_worker_metrics_read_the_engines_pool(tiny_folder):
    # A pool of 64 KiB: a handful of pages of the tiny model, so the budget setting is seen
    # (all of it: no cold tier, whose stream buffers the budget would reserve).
    with client("decode", tiny_folder, kv_cache_bytes=64 << 10, cold_kv=False) as c:
        body = decode_body("r0", PROMPT) | {"params": params(2)}
        assert c.post("/generate", json=body).status_code == 200
        text = c.get("/metrics").text
        engine = worker_of(c).engine
        usage, page_bytes = engine.kv_usage(), PagePool.page_bytes(engine.layout, 16)
    assert lint_exposition(text) == []
    assert usage.pages == (64 << 10) // page_bytes - 1  # the null page is nobody's
    got = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert got["tandem:kv_pages_capacity"] == usage.pages > 0
    assert got["tandem:kv_pages_used"] + got["tandem:kv_pages_cached"] <= usage.pages
    assert got["tandem:num_preemptions_total"] == 0
    assert "tandem:prefix_cache_device_tokens_total" in got


def test_tier_evictions_are_scraped(tiny_folder):
    with client("decode", tiny_folder) as c:
        shape = worker_of(c).engine.layout.block_shape
    block_bytes = math.prod(shape) * 4  # fp32
    # A memory tier of one and a half blocks: each new block evicts the one before.
    with client("decode", tiny_folder, memory_cache_bytes=block_bytes * 3 // 2) as c:
        for i in range(3):
            body = decode_body(f"r{i}", PROMPT) | {"params": params(2), "cache_salt": f"s{i}"}
            assert c.post("/generate", json=body).status_code == 200
        poll(lambda: sample(c.get("/metrics").text, "tandem:kvstore_evictions_total",
                            "memory") >= 4, 10, "evictions on /metrics")


def test_torch_threads_setting_sizes_the_forward(tiny_folder):
    import torch

    before = torch.get_num_threads()
    try:
        with client("decode", tiny_folder, torch_threads=1) as c:
            # Read on the engine thread, where the forward runs.
            threads = worker_of(c).runner.call(lambda _: torch.get_num_threads())
            assert threads.result(timeout=30) == 1
    finally:
        torch.set_num_threads(before)
