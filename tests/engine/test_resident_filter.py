"""The resident-page summary a worker publishes for KV-aware routing: it holds exactly what the
pool can match (no false negatives), follows eviction, and the router reads the same digests
from the token ids alone."""

from __future__ import annotations

import hashlib

import numpy as np

from engine.engine import Engine, EngineConfig
from engine.resident_filter import MAX_BITS, MIN_BITS, ResidentFilter, contains, filter_bits
from router.dispatch.kv_route import ResidentView, RoutePrefix
from tests.engine.helpers import greedy, make_request, page_bytes, run


def digest(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()


def view(f: ResidentFilter, page_size: int = 16) -> ResidentView:
    packed = np.frombuffer(f.packed(), dtype=np.uint8)
    return ResidentView(f.version, page_size, f.bits, packed)


def test_sizes_are_powers_of_two_within_bounds():
    assert filter_bits(1) == MIN_BITS
    assert filter_bits(1000) == 16384  # 16 bits a page, rounded up
    assert filter_bits(10**7) == MAX_BITS


def test_add_remove_and_no_false_negatives_when_saturated():
    f = ResidentFilter(num_pages=64)  # 1024 bits
    held = [digest(i) for i in range(2000)]  # far past capacity: counters saturate
    for d in held:
        f.add(d)
    packed = np.frombuffer(f.packed(), dtype=np.uint8)
    assert all(contains(packed, f.bits, d) for d in held)
    for d in held[:1000]:
        f.remove(d)
    packed = np.frombuffer(f.packed(), dtype=np.uint8)
    assert all(contains(packed, f.bits, d) for d in held[1000:])  # never a false negative


def test_removal_empties_the_filter_and_false_positives_are_rare():
    f = ResidentFilter(num_pages=1000)
    held = [digest(i) for i in range(1000)]
    v0 = f.version
    for d in held:
        f.add(d)
    assert f.version == v0 + 1000
    packed = np.frombuffer(f.packed(), dtype=np.uint8)
    others = [digest(i) for i in range(10**6, 10**6 + 5000)]
    fp = sum(contains(packed, f.bits, d) for d in others) / len(others)
    assert fp < 0.01  # ~0.24% expected at 16 bits a page and 4 hashes
    for d in held:
        f.remove(d)
    assert not f.counts.any()


def test_router_digests_match_what_the_engine_holds(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=2))
    doc = max(prompt_ids, key=len)
    run(engine, [make_request("a", doc, greedy(4), cache_salt="t1")])
    resident = view(engine.pool.resident, engine.config.page_size)
    fp, kv_format, P = smollm_fp32.fingerprint, engine.layout.name, engine.config.page_size
    mine = RoutePrefix(doc + [1, 2, 3], "t1").digests(fp, kv_format, P)
    assert resident.matched_pages(mine) * P == engine.cached_prefix_tokens(doc + [1, 2, 3], "t1")
    assert resident.matched_pages(mine) == (len(doc) - 1) // P
    other_tenant = RoutePrefix(doc, "t2").digests(fp, kv_format, P)
    assert resident.matched_pages(other_tenant) == 0
    other_text = RoutePrefix(prompt_ids[0] + doc, "t1").digests(fp, kv_format, P)
    assert resident.matched_pages(other_text) == 0


def test_evicted_pages_leave_the_summary(smollm_fp32, prompt_ids):
    # A pool of 16 pages: the second document's pages evict the first's.
    P = 16
    engine = Engine(smollm_fp32, EngineConfig(max_slots=1, kv_cache_bytes=17 * page_bytes(
        smollm_fp32)))
    doc = max(prompt_ids, key=len) * 4
    a, b = doc[: 12 * P + 1], (prompt_ids[1] + doc)[: 12 * P + 1]
    fp, fmt = smollm_fp32.fingerprint, engine.layout.name
    run(engine, [make_request("a", a, greedy(1))])
    assert view(engine.pool.resident).matched_pages(RoutePrefix(a, "").digests(fp, fmt, P)) == 12
    run(engine, [make_request("b", b, greedy(1))])
    after = view(engine.pool.resident)
    assert after.matched_pages(RoutePrefix(b, "").digests(fp, fmt, P)) == 12
    assert after.matched_pages(RoutePrefix(a, "").digests(fp, fmt, P)) < 12
    assert engine.pool.evictions > 0

