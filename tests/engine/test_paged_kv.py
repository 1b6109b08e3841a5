"""The page pool and page tables on a toy layout: refcounts, LRU eviction of cached pages,
copy-on-write, token addressing, block round trips and the step plan's groups and masks."""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine.kv_layout import KVLayout, blocks_to_flat, flat_to_blocks
from engine.page_hash import chain_root
from engine.page_pool import NULL_PAGE, PagePool
from engine.paged_kv import PagedKV
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.step_plan import (
    Chunk,
    Keys,
    StepPlan,
    Workspace,
    chunk_mask,
    decode_attention,
    decode_mask,
    group_rows,
)

LAYOUT = KVLayout(num_layers=2, num_kv_heads=3, head_dim=4, block_size=8, dtype=torch.float32)
P = 4  # tokens per page
# Stand-ins for page digests: 16 bytes, as engine/page_hash.py makes them (the resident
# filter reads its 4 positions from the digest's own bytes).
DIGEST_A, DIGEST_B = b"A" * 16, b"B" * 16


def _pool(pages: int = 9) -> PagePool:
    return PagePool(LAYOUT, pages, P, torch.device("cpu"))


def _paged(pages: int = 9) -> PagedKV:
    return PagedKV(_pool(pages), lambda salt: chain_root("fp", "float32", P, salt))


def _seq(ids: list[int], salt: str = "") -> Sequence:
    return Sequence("s", list(ids), len(ids), SamplingParams(), frozenset(), cache_salt=salt)


def _kv(t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 3, t, 4, generator=g)  # [L, 2, H, t, D]


def test_pages_are_zeroed_on_first_use_and_the_null_page_is_never_handed_out():
    pool = _pool(4)
    pool.kv.fill_(float("nan"))  # what uninitialised memory may hold
    pages = [pool.allocate() for _ in range(3)]
    assert NULL_PAGE not in pages and pool.num_free == 0
    assert not torch.isnan(pool.kv[:, :, pages]).any()


def test_prefaulted_pages_are_zeroed_at_start_and_later_fresh_ones_on_first_use():
    pool = PagePool(LAYOUT, 6, P, torch.device("cpu"), prefault=2)
    assert torch.count_nonzero(pool.kv[:, :, :3]) == 0  # the null page and pages 1, 2
    pool.kv[:, :, 3:].fill_(float("nan"))  # not prefaulted: still uninitialised memory
    pool.kv[:, :, 1, 0, 0, 0] = 5.0  # a prefaulted page is not zeroed again when handed out
    pages = [pool.allocate() for _ in range(5)]
    assert pages == [1, 2, 3, 4, 5]
    assert pool.kv[0, 0, 1, 0, 0, 0] == 5.0
    assert not torch.isnan(pool.kv).any()
    small = PagePool(LAYOUT, 3, P, torch.device("cpu"), prefault=99)  # capped at the pool
    assert torch.count_nonzero(small.kv) == 0 and small.num_free == 2


def test_eviction_takes_plain_then_fresh_then_the_oldest_cached_page():
    pool = _pool(5)  # pages 1..4
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.register(a, DIGEST_A)
    pool.register(b, DIGEST_B)
    pool.release([a, b])  # freed in reverse: b is the older free page
    pool.release([c])  # no digest: plain
    assert pool.num_free == 4 and pool.num_cached == 2
    assert pool.allocate() == c  # plain first
    assert pool.allocate() == 4  # then fresh
    assert pool.allocate() == b and pool.evictions == 1  # then the oldest cached
    assert pool.lookup([DIGEST_A, DIGEST_B]) == [a]  # b's digest is gone with it
    pool.share(a)  # a hit takes it out of the free pages
    assert pool.num_free == 0 and pool.ref[a] == 1


def test_a_long_prefix_or_a_full_pool_shares_the_cached_pages():
    kv = _paged(20)  # 19 usable pages
    first = _seq(list(range(6 * P + 1)))  # 6 full pages
    kv.grow(first, 6 * P + 1)
    first.kv_len = 6 * P + 1
    kv.commit(first)
    table = list(first.pages)
    kv.free(first)
    long = _seq(list(range(6 * P + 1)))
    assert kv.match(long) == 6 * P and long.pages == table[:6]  # > COPY_PREFIX_PAGES: shared
    assert all(kv.pool.ref[p] == 1 for p in table[:6])
    hog = _seq(list(range(100, 100 + 8 * P)))  # leaves fewer than half the pool free
    kv.grow(hog, 8 * P)
    short = _seq(list(range(P + 1)))
    assert kv.match(short) == P and short.pages == table[:1] and kv.pool.ref[table[0]] == 2


def test_a_growing_table_takes_the_next_page_when_it_is_plain_or_fresh_never_out_of_lru():
    pool = _pool(8)  # pages 1..7
    a, b, c, d = (pool.allocate() for _ in range(4))  # 1, 2, 3, 4
    pool.release([d, b])  # plain, b the older
    assert pool.allocate(after=c) == d  # the plain page after c, not the older b
    assert pool.allocate(after=d) == 5  # the next fresh page, though b is plain
    assert pool.allocate(after=7) == b  # no page 8: the oldest plain
    pool.register(a, DIGEST_A)
    pool.release([a])  # cached
    assert pool.allocate() == 6 and pool.allocate() == 7  # fresh ones before evicting
    pool.release([c])  # plain again
    assert pool.allocate(after=NULL_PAGE) == c  # page 1 is cached: not taken for adjacency
    assert pool.lookup([DIGEST_A]) == [a] and pool.evictions == 0


def test_match_takes_the_longest_cached_run_and_leaves_a_token_to_feed():
    kv = _paged()
    first = _seq(list(range(10)))  # 2 full pages, 2 tokens in a third
    kv.grow(first, 10)
    first.kv_len = 10
    kv.commit(first)
    assert first.committed == 2
    table = list(first.pages)
    kv.free(first)
    assert kv.pool.num_cached == 2
    again = _seq(list(range(8)))  # 8 tokens = 2 pages, but one token must stay to feed
    assert kv.match(again) == 4
    # A prefix this short is copied while the pool has room (COPY_PREFIX_PAGES); the cached
    # page stays cached.
    [copy] = again.pages
    assert copy != table[0] and kv.pool.ref[table[0]] == 0 and kv.pool.num_cached == 2
    assert torch.equal(kv.pool.kv[:, :, copy], kv.pool.kv[:, :, table[0]])
    longer = _seq(list(range(12)))
    assert kv.match(longer) == 8
    other = _seq(list(range(12)), salt="tenant-2")
    assert kv.match(other) == 0  # another tenant's digests differ


def test_a_fork_shares_pages_and_copies_a_partial_page_on_write():
    kv = _paged()
    parent = _seq(list(range(6)))
    kv.grow(parent, 6)
    kv.write(parent, 0, _kv(6))
    parent.kv_len = 6
    child = _seq(list(range(6)))
    child.kv_len = 6
    kv.fork(parent, child)
    assert child.pages == parent.pages and kv.pool.ref[parent.pages[1]] == 2
    assert kv.pages_needed(child, 7) == 1  # its next token lands in the shared partial page
    kv.grow(child, 7)
    assert child.pages[0] == parent.pages[0] and child.pages[1] != parent.pages[1]
    assert torch.equal(kv.read(child, 0, 6), kv.read(parent, 0, 6))  # the copy holds the same
    kv.write(child, 6, _kv(1, seed=5))
    assert torch.equal(kv.read(parent, 0, 6), _kv(6))  # the parent's page is untouched


def test_tokens_round_trip_through_scattered_pages_and_blocks():
    kv = _paged()
    seq = _seq(list(range(24)))
    kv.pool.allocate()  # make the table non-contiguous
    kv.grow(seq, 24)
    data = _kv(24)
    kv.write(seq, 0, data[:, :, :, :10])
    kv.write(seq, 10, data[:, :, :, 10:])
    assert torch.equal(kv.read(seq, 3, 21), data[:, :, :, 3:21])
    blocks = flat_to_blocks(kv.read(seq, 0, 24), 8)
    assert blocks.shape == (3, *LAYOUT.block_shape) and blocks.is_contiguous()
    assert torch.equal(blocks[1], data[:, :, :, 8:16])
    kv.write(seq, 0, _kv(24, seed=9))
    assert torch.equal(blocks_to_flat(blocks), data)  # an export never aliases the pool


def test_writes_and_reads_split_at_every_break_in_a_table_and_touch_no_other_page():
    kv = _paged(12)
    kv.pool.kv.zero_()  # never-handed-out pages hold whatever was there: NaN != NaN
    seq = _seq(list(range(24)))
    assert [kv.pool.allocate() for _ in range(8)] == list(range(1, 9))
    seq.pages = [6, 7, 3, 4, 5, 8]  # three runs of consecutive pages
    assert kv.runs(seq.pages, 3, 19) == [(6, 3, 0, 5), (3, 0, 5, 12), (8, 0, 17, 2)]
    before = kv.pool.kv.clone()
    data = _kv(19)
    kv.write(seq, 3, data)  # tokens [3, 22)
    assert torch.equal(kv.read(seq, 3, 22), data)
    changed = (kv.pool.kv != before).flatten(3).any(-1).any(0).any(0).nonzero().flatten()
    assert set(changed.tolist()) <= set(seq.pages)
    assert torch.equal(kv.read_blocks(seq, 1, 2, 8), flat_to_blocks(kv.read(seq, 8, 24), 8))


def test_decode_rows_group_by_length_and_masks_hide_the_rest():
    assert group_rows([2900, 2890, 400, 390, 380, 12]) == [(0, 2), (2, 5), (5, 6)]
    assert group_rows([300, 100, 45]) == [(0, 3)]  # within 256 keys of the longest
    m = chunk_mask(start=3, t=2, dtype=torch.float32, device=torch.device("cpu"))
    assert m.shape == (1, 1, 2, 5)
    assert (m[0, 0, 0, :4] == 0).all() and m[0, 0, 0, 4] < -1e30 and (m[0, 0, 1] == 0).all()
    d = decode_mask([1, 3], 4, torch.float32, torch.device("cpu"))
    assert d.shape == (2, 1, 1, 4)
    assert d[0, 0, 0, 0] == 0 and (d[0, 0, 0, 1:] < -1e30).all() and (d[1, 0, 0, :3] == 0).all()


def test_step_plan_addresses_pages_and_keeps_only_the_logits_rows_that_sample():
    cpu, f32 = torch.device("cpu"), torch.float32
    # two decode rows (pages [3, 5] at position 6, page [7] at 2), then a whole prompt
    plan = StepPlan.build([([3, 5], 6), ([7], 2)], [Chunk([2], 0, [5, 6, 7], keep=1)], P,
                          f32, cpu)
    assert plan.slots.tolist() == [5 * P + 2, 7 * P + 2, 2 * P, 2 * P + 1, 2 * P + 2]
    assert plan.kept_rows() == [0, 1, 4]
    [g] = plan.groups
    assert g.keys.table.tolist() == [3, 5, 7, NULL_PAGE] and g.keys.width == 2 * P
    assert g.mask[0, 0, 0, :7].eq(0).all() and g.mask[1, 0, 0, 3:].lt(-1e30).all()
    assert plan.flat_inputs([9, 9], [6, 2]) == ([9, 9, 5, 6, 7], [6, 2, 0, 1, 2])
    # a lone decode row attends to exactly its own keys, unmasked (HF's batch-1 call)
    [lone] = StepPlan.build([([4, 1], 5)], [], P, f32, cpu).groups
    assert lone.keys.width == 6 and lone.mask is None and lone.keys.table.tolist() == [4, 1]
    # a chunk mid-prefill alone keeps no row: one row (never 0, which would mean all)
    assert StepPlan.build([], [Chunk([1], 0, [1, 2, 3])], P, f32, cpu).kept_rows() == 1
    # every position of a chunk (prompt logprobs) after one from position 0
    plan = StepPlan.build([], [Chunk([1], 0, [1, 2]), Chunk([2, 3], 5, [3, 4, 5], keep=3)],
                          P, f32, cpu)
    assert plan.kept_rows() == 3 and plan.masks[0] is None and plan.masks[1].shape == (1, 1, 3, 8)
    assert plan.keys[0] is None and plan.keys[1].first == 2  # pages 2, 3: read in place


def test_consecutive_pages_are_read_in_place_equal_to_a_gather():
    """A lone table of consecutive pages is a view of the pool; a gather of the same pages
    (and the workspace path) gives the same keys and values."""
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 9, P, 3, 4, generator=g)  # one layer: [2, N, P, H, D]
    view = Keys.of([[4, 5, 6]], 3, 2 * P + 1, torch.device("cpu"))
    assert view.first == 4 and view.table is None
    gathered = Keys(1, 3, 2 * P + 1, torch.tensor([4, 5, 6]))
    for ws in (None, Workspace()):
        for a, b in zip(view.read(kv, ws), gathered.read(kv, ws), strict=True):
            assert a.shape == (1, 3, 2 * P + 1, 4) and torch.equal(a, b)
    k, v = view.read(kv, None)
    assert torch.equal(k[0, :, P + 1], kv[0, 5, 1]) and torch.equal(v[0, :, 0], kv[1, 4, 0])
    assert Keys.of([[4, 6, 7]], 3, 3 * P, torch.device("cpu")).first is None  # not a run


class _GQA(torch.nn.Module):
    """What transformers' sdpa function reads off an attention module: 9 query heads over 3."""

    num_key_value_groups = 3
    is_causal = True


def test_decode_attention_keeps_generates_call_in_fp32_and_packs_query_heads_in_bf16():
    """A lone fp32 row is transformers' own SDPA call, bit for bit (what generate() runs); a
    bf16 row packs the 3 query heads of each key head as its rows, which must map every query
    head to its own key head (checked against repeat_kv in fp32 arithmetic)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 64, generator=g)  # [g, Hq, 1, D]
    k, v = (torch.randn(1, 3, 40, 64, generator=g) for _ in range(2))  # [g, H, width, D]
    kw = {"scaling": 0.125}
    want, _ = sdpa_attention_forward(_GQA(), q, k, v, None, **kw)  # [1, 1, Hq, D]
    assert torch.equal(decode_attention(sdpa_attention_forward, _GQA(), q, k, v, None, kw), want)
    bf = [x.bfloat16() for x in (q, k, v)]
    got = decode_attention(sdpa_attention_forward, _GQA(), *bf, None, kw)
    assert got.shape == (1, 1, 9, 64) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
