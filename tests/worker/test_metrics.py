"""A worker's /metrics: counters a tier keeps itself (evictions, disk full) are scraped from
the store's stats, per tier."""

from __future__ import annotations

import math

from tests.e2e.faults import poll
from tests.worker.apps import PROMPT, client, decode_body, params, worker_of


def sample(text: str, name: str, tier: str) -> float:
    [line] = [ln for ln in text.splitlines() if ln.startswith(f"{name}{{")
              and f'tier="{tier}"' in ln]
    return float(line.rsplit(" ", 1)[1])


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
