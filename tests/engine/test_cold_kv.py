"""Context beyond the KV budget: a long sequence keeps a window of pages resident, the rest goes
to a cold tier, and attention streams it back and merges the parts exactly (engine/cold_kv.py,
engine/cold_stream.py). Output equals all-resident attention, logits within 1e-4 in fp32."""

from __future__ import annotations

import pathlib

import pytest
import torch

from engine.cold_kv import (
    SEGMENT_TOKENS,
    ColdKV,
    ColdKVLost,
    ColdSpan,
    HostColdTier,
    table_len,
)
from engine.cold_stream import stream_reserve
from engine.engine import Engine, EngineConfig
from engine.kv_layout import KVLayout
from engine.page_pool import PagePool
from engine.sequence import SeqRequest
from tests.engine.helpers import greedy, hf_greedy, make_request, run

P = 16
DOCS = pathlib.Path(__file__).parents[2] / "docs"


@pytest.fixture(scope="module")
def long_ids(smollm_fp32) -> list[int]:
    """~6k tokens of natural text (the project's docs)."""
    text = "\n\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    ids = smollm_fp32.tokenizer(text).input_ids
    assert len(ids) >= 6000, len(ids)
    return ids[:6000]


def token_bytes(loaded) -> int:
    return PagePool.page_bytes(KVLayout.from_config(loaded.config, 64, loaded.dtype), 1)


class Spy:
    """Records the logits of every forward of an engine (a spy, not a mock: it returns them)."""

    def __init__(self, engine: Engine):
        self.logits: list[torch.Tensor] = []
        step = engine._fwd.step

        def recorded(*args, **kwargs):
            out = step(*args, **kwargs)
            self.logits.append(out.clone())
            return out

        engine._fwd.step = recorded


class LosingTier(HostColdTier):
    """Forgets one segment the first time it is read back (an eviction, a disk fault)."""

    def __init__(self):
        super().__init__()
        self.lost: str | None = None

    def get(self, keys):
        if self.lost is None and any(k in self.tensors for k in keys):
            self.lost = next(k for k in keys if k in self.tensors)
            del self.tensors[self.lost]
        return super().get(keys)


# --- the engine -------------------------------------------------------------------------------

def test_six_k_context_at_a_quarter_of_its_kv_matches_resident_attention(smollm_fp32, long_ids):
    new = 12
    params = greedy(new, ignore_eos=True)
    resident = Engine(smollm_fp32, EngineConfig(prefix_caching=False))
    ref_spy = Spy(resident)
    ref = run(resident, [make_request("r", long_ids, params)])["r"].tokens

    budget = (len(long_ids) + new) * token_bytes(smollm_fp32) // 4
    cold = Engine(smollm_fp32, EngineConfig(kv_cache_bytes=budget, prefix_caching=False),
                  cold_tier=HostColdTier())
    spy = Spy(cold)
    out = run(cold, [make_request("c", long_ids, params)])["c"].tokens

    assert out == ref
    assert cold.stats.kv_cold_tokens > 4000  # most of the context streamed, not resident
    assert 0 < cold.stats.kv_peak_bytes <= budget
    # every decode step's logits (and the prompt's last position's), fp32
    got, want = spy.logits[-new:], ref_spy.logits[-new:]
    assert max((g - w).abs().max().item() for g, w in zip(got, want, strict=True)) < 1e-4


def test_prefetched_stream_greedy_equals_generate(smollm_fp32, long_ids):
    """The same with each segment loaded a step ahead on the prefetch thread."""
    ids = long_ids[:2500]
    want, _, _ = hf_greedy(smollm_fp32, ids, 24)
    engine = Engine(smollm_fp32, EngineConfig(kv_window=512, prefix_caching=False,
                                              cold_prefetch=True), cold_tier=HostColdTier())
    got = run(engine, [make_request("a", ids, greedy(24))])["a"].tokens
    assert got == want
    assert engine.stats.kv_cold_tokens >= 1900


def test_forks_of_a_long_sequence_share_its_cold_span(smollm_fp32, long_ids):
    ids = long_ids[:1500]
    want, _, _ = hf_greedy(smollm_fp32, ids, 16)
    tier = HostColdTier()
    engine = Engine(smollm_fp32, EngineConfig(kv_window=256), cold_tier=tier)
    engine.add(make_request("p", ids, greedy(16)))
    engine.fork("p", "c", greedy(16))
    out = run(engine, [])
    assert out["p"].tokens == out["c"].tokens == want
    engine.step()  # retires the finished pair
    assert not tier.tensors  # every segment deleted once its last holder finished


def test_a_lost_cold_segment_costs_a_recompute_not_the_output(smollm_fp32, long_ids):
    ids = long_ids[:1200]
    want, _, _ = hf_greedy(smollm_fp32, ids, 12)
    tier = LosingTier()
    engine = Engine(smollm_fp32, EngineConfig(kv_window=256, prefix_caching=False),
                    cold_tier=tier)
    got = run(engine, [make_request("a", ids, greedy(12))])["a"].tokens
    assert tier.lost is not None
    assert engine.stats.preemptions == 1
    assert got == want


def test_a_long_handoff_goes_through_the_window_into_cold_on_both_sides(smollm_fp32, long_ids):
    """1P+1D: the prefill worker's export reads the cold span back; the decode worker's import
    goes through its window into its own cold tier. Nothing is recomputed and the KV arrives
    bit-exact; the continuation equals generate()."""
    ids = long_ids[:1400]  # full blocks and a tail (8 tokens at 16 a block)
    want, _, _ = hf_greedy(smollm_fp32, ids, 12)
    config = EngineConfig(kv_window=320, prefix_caching=False)
    prefill = Engine(smollm_fp32, config, cold_tier=HostColdTier())
    prefill.add(make_request("r", ids, greedy(12), prefill_only=True))
    while not (events := prefill.step()):
        pass
    [first] = events
    B = prefill.layout.block_size
    n = len(ids) // B
    blocks = prefill.export_blocks("r", 0, n)  # [n, L, 2, H, B, D]
    tail = prefill.export_kv("r", n * B, len(ids))
    assert tail.shape[3] > 0
    assert prefill.stats.kv_cold_tokens > 0
    prefill.release("r")

    decode = Engine(smollm_fp32, config, cold_tier=HostColdTier())
    req = SeqRequest("r", ids + [first.token_id], len(ids), greedy(12), prefix_kv=blocks,
                     prefix_len=len(ids), prefix_tail=tail)
    got = run(decode, [req], max_steps=100)["r"].tokens
    assert [first.token_id] + got == want
    assert decode.stats.prefill_tokens == 0 and decode.stats.kv_cold_tokens > 1000
    assert torch.equal(decode.export_blocks("r", 0, n), blocks)


def test_a_full_pool_sends_pages_cold_before_it_preempts(smollm_fp32, prompt_ids):
    """Six sequences needing ~1,100 tokens of KV in a pool of ~600: with a cold tier the
    pool makes room by moving pages out (a copy) rather than preempting (a recompute), and
    the text equals a run with memory to spare."""
    long = max(prompt_ids, key=len)

    def reqs():
        return [make_request(str(i), ids + long[: 40 * i], greedy(24, ignore_eos=True))
                for i, ids in enumerate(prompt_ids[:6])]

    roomy = run(Engine(smollm_fp32, EngineConfig(max_slots=8)), reqs())
    budget = 38 * P * token_bytes(smollm_fp32)
    tight = Engine(smollm_fp32, EngineConfig(max_slots=8, kv_cache_bytes=budget),
                   cold_tier=HostColdTier())
    out = run(tight, reqs())
    assert tight.stats.kv_shrinks > 0 and tight.stats.preemptions == 0
    assert {k: r.tokens for k, r in out.items()} == {k: r.tokens for k, r in roomy.items()}


def test_a_cold_tier_lifts_the_pool_capacity_limit(smollm_fp32):
    small = 40 * P * token_bytes(smollm_fp32) + stream_reserve(
        KVLayout.from_config(smollm_fp32.config, 64, smollm_fp32.dtype), True, SEGMENT_TOKENS)
    req = make_request("a", list(range(100, 1100)), greedy(8))
    with pytest.raises(ValueError, match="KV pool holds"):
        Engine(smollm_fp32, EngineConfig(kv_cache_bytes=small)).check(req)
    Engine(smollm_fp32, EngineConfig(kv_cache_bytes=small), cold_tier=HostColdTier()).check(req)


# --- ColdKV alone, over a pool of numbered tokens -----------------------------------------------

class Seq:
    def __init__(self, pages, kv_len):
        self.pages, self.kv_len, self.cold = pages, kv_len, None


def numbered_pool(pages: int) -> PagePool:
    """A pool whose every token's K and V hold the token's own position (filled by `fill`)."""
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=2, block_size=64,
                      dtype=torch.float32)
    return PagePool(layout, pages, P, torch.device("cpu"))


def fill(pool: PagePool, n_tokens: int) -> Seq:
    seq = Seq([pool.allocate() for _ in range(-(-n_tokens // P))], n_tokens)
    for i, page in enumerate(seq.pages):
        pos = torch.arange(i * P, (i + 1) * P, dtype=torch.float32)
        pool.kv[:, :, page] = pos[:, None, None]
    return seq


def test_pages_go_cold_oldest_first_after_the_sink_and_read_back_in_order():
    pool = numbered_pool(64)
    cold = ColdKV(HostColdTier(), pool, window=16)
    seq = fill(pool, 20 * P)  # 20 pages, 4 over the window
    assert cold.fit(seq, 1) == 1
    assert len(seq.pages) <= 16 and table_len(seq) + 1 <= 16 * P
    assert seq.cold.sink == cold.sink_pages * P
    moved = seq.cold.tokens
    assert moved % P == 0 and moved >= 4 * P
    kv = cold.read(seq.cold, seq.cold.sink, seq.cold.sink + moved)  # [L, 2, H, t, D]
    expect = torch.arange(seq.cold.sink, seq.cold.sink + moved, dtype=torch.float32)
    assert torch.equal(kv[:, :, 0, :, 0], expect.expand(2, 2, -1))
    # the pages left are the sink and the most recent ones
    first_recent = pool.kv[0, 0, seq.pages[cold.sink_pages], 0, 0, 0].item()
    assert first_recent == seq.cold.sink + moved


def test_segments_grow_to_their_limit_then_a_new_one_starts():
    pool = numbered_pool(8)
    tier = HostColdTier()
    cold = ColdKV(tier, pool, window=4)
    span = ColdSpan(0)
    for _ in range(3):
        cold.append(span, torch.zeros(2, 2, SEGMENT_TOKENS // 2, 1, 2))
    assert [s.tokens for s in span.segments] == [SEGMENT_TOKENS, SEGMENT_TOKENS // 2]
    assert len(tier.tensors) == 2 * 2  # replaced segments were deleted (2 layers each)
    shared = cold.share(span)
    cold.append(shared, torch.zeros(2, 2, 16, 1, 2))  # the shared last segment is not rewritten
    assert [s.tokens for s in shared.segments] == [SEGMENT_TOKENS, SEGMENT_TOKENS // 2, 16]
    cold.release(span)
    assert len(tier.tensors) == 3 * 2
    cold.release(shared)
    assert not tier.tensors


def test_a_missing_segment_raises_cold_kv_lost():
    pool = numbered_pool(64)
    tier = HostColdTier()
    cold = ColdKV(tier, pool, window=16)
    seq = fill(pool, 20 * P)
    cold.fit(seq, 1)
    tier.tensors.clear()
    with pytest.raises(ColdKVLost):
        cold.read(seq.cold, seq.cold.sink, seq.cold.sink + 1)
