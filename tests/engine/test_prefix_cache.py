"""The device prefix cache: full pages of finished sequences stay in the pool, findable by their
chained digests, and a sequence sharing their tokens (same cache salt) starts from them, with
output as if computed afresh. Many entries, evicted least recently freed first."""

from __future__ import annotations

from engine.engine import Engine, EngineConfig
from engine.kv_layout import KVLayout
from engine.page_pool import PagePool
from tests.engine.helpers import greedy, hf_greedy, make_request, run

NEW = 16
P = 16  # the default page size


def first_event_cached(result) -> int:
    return result.events[0].num_cached_tokens


def pages_of(n_tokens: int) -> int:
    """Tokens a prompt of n tokens can take from the cache: its full pages, one token kept."""
    return (n_tokens - 1) // P * P


def test_next_turn_reuses_the_finished_sequence(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=4))
    doc = max(prompt_ids, key=len)  # 4+ blocks
    first = run(engine, [make_request("a", doc, greedy(NEW))])["a"]
    assert first_event_cached(first) == 0
    # The next turn: the whole first exchange plus a few new tokens (not page-aligned).
    turn = doc + first.tokens + prompt_ids[0][:7]
    second = run(engine, [make_request("b", turn, greedy(NEW))])["b"]
    # Every full page the first sequence computed is reused (its last sampled token was never
    # fed, so the page holding it was not full).
    assert first_event_cached(second) == (len(doc) + len(first.tokens) - 1) // P * P
    assert second.tokens == hf_greedy(smollm_fp32, turn, NEW)[0]
    assert engine.stats.prefix_device_tokens == first_event_cached(second)


def test_reuse_stops_at_the_page_where_the_tokens_differ(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=2))
    doc = max(prompt_ids, key=len)
    run(engine, [make_request("a", doc, greedy(4))])
    other = doc[:100] + prompt_ids[1]  # shares 100 tokens: 6 whole pages
    got = run(engine, [make_request("b", other, greedy(NEW))])["b"]
    assert first_event_cached(got) == 96
    assert got.tokens == hf_greedy(smollm_fp32, other, NEW)[0]


def test_another_tenant_never_reuses_it(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=2))
    doc = max(prompt_ids, key=len)
    run(engine, [make_request("a", doc, greedy(4), cache_salt="tenant-1")])
    got = run(engine, [make_request("b", doc, greedy(4), cache_salt="tenant-2")])["b"]
    assert first_event_cached(got) == 0
    again = run(engine, [make_request("c", doc, greedy(4), cache_salt="tenant-2")])["c"]
    assert first_event_cached(again) == pages_of(len(doc))  # its own tenant's pages: reused
    probe = engine.cached_prefix_tokens
    assert probe(doc, "tenant-2") == pages_of(len(doc)) and probe(doc, "tenant-3") == 0


def test_every_document_stays_cached_not_just_the_last(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=4))
    long = max(prompt_ids, key=len)
    docs = [ids + long for ids in prompt_ids[:4]]  # four distinct documents
    for i, doc in enumerate(docs):
        run(engine, [make_request(f"cold{i}", doc, greedy(4))])
    for i, doc in enumerate(docs):
        got = run(engine, [make_request(f"warm{i}", doc + [42], greedy(NEW))])[f"warm{i}"]
        assert first_event_cached(got) == pages_of(len(doc) + 1)
    assert got.tokens == hf_greedy(smollm_fp32, docs[-1] + [42], NEW)[0]


def test_a_small_pool_evicts_the_least_recently_freed_pages(smollm_fp32, prompt_ids):
    long = max(prompt_ids, key=len)
    layout = KVLayout.from_config(smollm_fp32.config, 64, smollm_fp32.dtype)
    page = PagePool.page_bytes(layout, P)
    doc_pages = -(-(len(long) + 8) // P)
    # Room for two documents and their decodes, not three.
    engine = Engine(smollm_fp32, EngineConfig(kv_cache_bytes=(2 * doc_pages + 3) * page))
    docs = [ids + long for ids in prompt_ids[:3]]
    for i, doc in enumerate(docs):
        run(engine, [make_request(str(i), doc, greedy(4))])
    assert engine.pool.evictions > 0
    newest = run(engine, [make_request("c", docs[2] + [42], greedy(4))])["c"]
    assert first_event_cached(newest) == pages_of(len(docs[2]) + 1)
    oldest = run(engine, [make_request("a", docs[0] + [42], greedy(NEW))])["a"]
    assert first_event_cached(oldest) < pages_of(len(docs[0]) + 1)  # some of it was evicted
    assert oldest.tokens == hf_greedy(smollm_fp32, docs[0] + [42], NEW)[0]


def test_prompts_sharing_a_prefix_at_once_compute_it_once(smollm_fp32, prompt_ids):
    """Three prompts with one 4+ page prefix, added together: the first computes it, the
    others wait a step and take its pages (SGLang's in-batch prefix caching). A prompt that
    shares only a page or two (a chat header) never waits."""
    engine = Engine(smollm_fp32, EngineConfig(max_slots=8))
    doc = max(prompt_ids, key=len)  # 4+ blocks
    reqs = [make_request(f"q{i}", doc + tail, greedy(8))
            for i, tail in enumerate(prompt_ids[:3])]
    short = make_request("short", doc[:20] + prompt_ids[3], greedy(8))  # shares 1 page
    got = run(engine, [*reqs, short])
    shared = pages_of(len(doc) + 1)
    assert [first_event_cached(got[f"q{i}"]) for i in range(3)] == [0, shared, shared]
    assert first_event_cached(got["short"]) == 0
    assert engine.stats.prefill_tokens == sum(len(r.token_ids) for r in [*reqs, short]) - (
        2 * shared)
    assert engine.stats.shared_prefix_waits >= 2
    for i, r in enumerate(reqs):
        assert got[f"q{i}"].tokens == hf_greedy(smollm_fp32, r.token_ids, 8)[0]


def test_no_wait_without_the_prefix_cache(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=8, prefix_caching=False))
    doc = max(prompt_ids, key=len)
    run(engine, [make_request(f"q{i}", doc + prompt_ids[i], greedy(2)) for i in range(2)])
    assert engine.stats.shared_prefix_waits == 0
