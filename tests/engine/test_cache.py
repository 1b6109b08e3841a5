"""Slot KV cache and slot table on a toy layout: growth, copies, block round trips, compaction."""

from __future__ import annotations

import pytest
import torch

from engine.cache import SlotKVCache, blocks_to_flat, flat_to_blocks
from engine.kv_layout import KVLayout
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.slots import SlotTable
from engine.step_plan import Chunk, StepPlan, chunk_mask, decode_mask

LAYOUT = KVLayout(num_layers=2, num_kv_heads=3, head_dim=4, block_size=8, dtype=torch.float32)


def _cache(max_slots: int = 8, max_len: int = 1000) -> SlotKVCache:
    return SlotKVCache(LAYOUT, max_slots, max_len, torch.device("cpu"), init_slots=2)


def _kv(t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 3, t, 4, generator=g)  # [L, 2, H, t, D]


def test_grows_keeping_contents_and_caps_at_limits():
    c = _cache()
    kv = _kv(20)
    c.write(1, 0, kv)
    c.reserve(slots=5, length=600)
    assert c.num_slots == 8 and c.capacity == 1000  # doubled, capped (1000 = 125 blocks)
    assert torch.equal(c.read(1, 0, 20), kv)
    with pytest.raises(AssertionError):
        c.reserve(slots=9)


def test_blocks_round_trip_lossless():
    c = _cache()
    kv = _kv(8 * 3 + 5)
    c.write(0, 0, kv)
    blocks = flat_to_blocks(c.read(0, 0, 24), 8)
    assert blocks.shape == (3, *LAYOUT.block_shape) and blocks.is_contiguous()
    assert torch.equal(blocks[1], kv[:, :, :, 8:16])
    c.write_blocks(1, blocks)
    assert torch.equal(c.read(1, 0, 24), kv[:, :, :, :24])
    assert torch.equal(blocks_to_flat(flat_to_blocks(kv[:, :, :, :24], 8)), kv[:, :, :, :24])


def test_move_and_swap_copy_one_sequence():
    c = _cache()
    a, b = _kv(5, 1), _kv(9, 2)
    c.write(0, 0, a)
    c.write(1, 0, b)
    c.swap(0, 5, 1, 9)
    assert torch.equal(c.read(0, 0, 9), b) and torch.equal(c.read(1, 0, 5), a)
    c.reserve(slots=3)
    c.move(0, 2, 9)
    assert torch.equal(c.read(2, 0, 9), b)


def test_masks_hide_future_and_other_rows_tails():
    m = chunk_mask(start=3, t=2, dtype=torch.float32, device=torch.device("cpu"))
    assert m.shape == (1, 1, 2, 5)
    assert (m[0, 0, 0, :4] == 0).all() and m[0, 0, 0, 4] < -1e30 and (m[0, 0, 1] == 0).all()
    d = decode_mask(torch.tensor([0, 2]), 3, torch.float32)
    assert d.shape == (2, 1, 1, 3)
    assert d[0, 0, 0, 0] == 0 and (d[0, 0, 0, 1:] < -1e30).all() and (d[1] == 0).all()


def _seq(name: str, kv_len: int, decoding: bool = True) -> Sequence:
    # A decoder has exactly one token left to feed; a prefill has more.
    tokens = [1] * (kv_len + (1 if decoding else 5))
    return Sequence(name, tokens, len(tokens), SamplingParams(), frozenset(), kv_len=kv_len)


def test_compaction_packs_decoders_low_and_swaps_a_prefill_out():
    c = _cache()
    table = SlotTable(c)
    seqs = [_seq(f"s{i}", 3 + i) for i in range(4)]
    for s in seqs:
        table.alloc(s)
        c.write(s.slot, 0, _kv(s.kv_len, seed=s.kv_len))
    prefill = _seq("p", 6, decoding=False)
    table.free(seqs[0])  # hole at 0
    table.free(seqs[1])  # hole at 1
    table.alloc(prefill)  # takes slot 0 -> in the way of the dense range
    assert prefill.slot == 0
    decoders = table.compact()
    assert [s.seq_id for s in decoders] == ["s3", "s2"]
    assert {s.slot for s in decoders} == {0, 1} and prefill.slot >= 2
    for s in decoders:  # contents travelled with their sequences
        assert torch.equal(c.read(s.slot, 0, s.kv_len), _kv(s.kv_len, seed=s.kv_len))
    assert table.copies >= 2


def test_exported_blocks_never_alias_the_cache():
    # One slot, one block of capacity, exported whole: the permuted view is contiguous.
    c = SlotKVCache(LAYOUT, 1, 8, torch.device("cpu"), init_slots=1)
    c.write(0, 0, _kv(8))
    block = flat_to_blocks(c.read(0, 0, 8), 8)
    c.write(0, 0, _kv(8, seed=9))
    assert torch.equal(blocks_to_flat(block), _kv(8))


def test_idle_engine_gives_back_a_grown_cache(tiny_fp32):
    from engine.engine import Engine, EngineConfig
    from tests.engine.helpers import greedy, make_request, run

    engine = Engine(tiny_fp32, EngineConfig(max_slots=16))
    initial = engine._cache.nbytes
    reqs = [make_request(str(i), list(range(5, 15)), greedy(3, ignore_eos=True)) for i in range(16)]
    run(engine, reqs)
    assert engine._cache.num_slots == 16  # the burst grew it...
    engine.step()  # idle step: nothing held
    assert engine._cache.nbytes == initial  # ...and idleness gave it back


def test_step_plan_keeps_only_the_logits_rows_that_sample():
    cpu, f32 = torch.device("cpu"), torch.float32
    # two decode rows, then a chunk that completes its prompt: the last 3 flat positions
    plan = StepPlan.build([4, 7], [Chunk(2, 0, [5, 6, 7], keep=1)], f32, cpu)
    assert plan.kept_rows() == [0, 1, 4] and plan.max_len == 8
    assert plan.flat_inputs([9, 9], [4, 7]) == ([9, 9, 5, 6, 7], [4, 7, 0, 1, 2])
    # a chunk mid-prefill alone keeps no row: one row (never 0, which would mean all)
    assert StepPlan.build([], [Chunk(0, 0, [1, 2, 3])], f32, cpu).kept_rows() == 1
    # decode rows only: the last n positions, as an int
    assert StepPlan.build([3, 3, 3], [], f32, cpu).kept_rows() == 0
    # every position of a chunk (prompt logprobs) after a mid-prefill chunk
    plan = StepPlan.build([], [Chunk(0, 0, [1, 2]), Chunk(1, 64, [3, 4, 5], keep=3)], f32, cpu)
    assert plan.kept_rows() == 3 and plan.masks[0] is None and plan.masks[1].shape == (1, 1, 3, 67)
