"""The last finished sequence's KV stays in its slot and a next sequence sharing its tokens (same
cache salt) starts from it: token-level reuse with no copy, and output as if computed afresh."""

from __future__ import annotations

from engine.engine import Engine, EngineConfig
from tests.engine.helpers import greedy, hf_greedy, make_request, run

NEW = 16


def first_event_cached(result) -> int:
    return result.events[0].num_cached_tokens


def test_next_turn_reuses_the_finished_sequence_token_by_token(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=4))
    doc = max(prompt_ids, key=len)  # 4+ blocks
    first = run(engine, [make_request("a", doc, greedy(NEW))])["a"]
    assert first_event_cached(first) == 0
    # The next turn: the whole first exchange plus a few new tokens (not block-aligned).
    turn = doc + first.tokens + prompt_ids[0][:7]
    second = run(engine, [make_request("b", turn, greedy(NEW))])["b"]
    # Every token whose KV the first sequence computed is reused (its last sampled token
    # was never fed, so it is computed with the new ones).
    assert first_event_cached(second) == len(doc) + len(first.tokens) - 1
    assert second.tokens == hf_greedy(smollm_fp32, turn, NEW)[0]


def test_reuse_stops_where_the_tokens_differ(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=2))
    doc = max(prompt_ids, key=len)
    run(engine, [make_request("a", doc, greedy(4))])
    other = doc[:100] + prompt_ids[1]  # shares 100 tokens
    got = run(engine, [make_request("b", other, greedy(NEW))])["b"]
    assert first_event_cached(got) == 100
    assert got.tokens == hf_greedy(smollm_fp32, other, NEW)[0]


def test_another_tenant_never_reuses_it(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=2))
    doc = max(prompt_ids, key=len)
    run(engine, [make_request("a", doc, greedy(4), cache_salt="tenant-1")])
    got = run(engine, [make_request("b", doc, greedy(4), cache_salt="tenant-2")])["b"]
    assert first_event_cached(got) == 0
    again = run(engine, [make_request("c", doc, greedy(4), cache_salt="tenant-2")])["c"]
    assert first_event_cached(again) == len(doc) - 1  # its own tenant's sequence: reused


def test_a_needed_slot_evicts_it_and_a_burst_keeps_it(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=1))
    doc = max(prompt_ids, key=len)
    run(engine, [make_request("a", doc, greedy(4))])
    unrelated = run(engine, [make_request("b", prompt_ids[2], greedy(NEW))])["b"]  # evicts "a"
    assert unrelated.tokens == hf_greedy(smollm_fp32, prompt_ids[2], NEW)[0]
    assert first_event_cached(run(engine, [make_request("c", doc, greedy(4))])["c"]) == 0

    engine = Engine(smollm_fp32, EngineConfig(max_slots=4))
    burst = [make_request(str(i), ids, greedy(4)) for i, ids in enumerate(prompt_ids[:3])]
    run(engine, burst + [make_request("doc", doc, greedy(NEW))])  # "doc" finishes last
    engine.step()  # idle: the cache shrinks to one slot, keeping the retained KV
    assert engine._cache.num_slots == 1
    got = run(engine, [make_request("again", doc + [42], greedy(NEW))])["again"]
    assert first_event_cached(got) == len(doc)
    assert got.tokens == hf_greedy(smollm_fp32, doc + [42], NEW)[0]
