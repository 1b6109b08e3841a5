"""Which sequence holds which slot of the KV cache, and the compaction that keeps decoding
sequences dense in slots [0, n).

    before compact:  [d0][  ][d2][p ][d4]      d = decoder, p = prefilling, [  ] = free
    after compact:   [d0][d4][d2][p ][  ]      the highest decoder moved into the lowest hole

Each move copies one sequence's tokens [0, kv_len), and only when a sequence has left or
stopped decoding: never per step. A non-decoder in the way (a prefill in progress) is swapped
out, which is rare: at most one sequence is mid-prefill between steps.
"""

from __future__ import annotations

from engine.cache import SlotKVCache
from engine.sequence import Sequence


class SlotTable:
    def __init__(self, cache: SlotKVCache):
        self.cache = cache
        self.holders: list[Sequence | None] = []  # index = slot
        self.copies = 0  # sequences copied between slots, for stats

    @property
    def num_held(self) -> int:
        return sum(1 for s in self.holders if s is not None)

    def has_free(self) -> bool:
        return self.num_held < self.cache.max_slots

    def alloc(self, seq: Sequence) -> None:
        """Give seq the lowest free slot, growing the cache's slot capacity if needed."""
        assert seq.slot < 0 and self.has_free()
        slot = next((i for i, s in enumerate(self.holders) if s is None), len(self.holders))
        if slot == len(self.holders):
            self.holders.append(None)
        self.cache.reserve(slots=slot + 1)
        self.holders[slot] = seq
        seq.slot = slot

    def free(self, seq: Sequence) -> None:
        assert self.holders[seq.slot] is seq
        self.holders[seq.slot] = None
        seq.slot = -1
        while self.holders and self.holders[-1] is None:
            self.holders.pop()

    def hand_over(self, old: Sequence, new: Sequence) -> None:
        """`new` takes over `old`'s slot and the KV in it."""
        assert new.slot < 0 and self.holders[old.slot] is old
        new.slot, old.slot = old.slot, -1
        self.holders[new.slot] = new

    def move_to(self, seq: Sequence, dst: int) -> None:
        """Copy seq's KV into the free slot dst and hold that one instead."""
        self._move(seq, dst)
        while self.holders and self.holders[-1] is None:
            self.holders.pop()

    def _move(self, seq: Sequence, dst: int) -> None:
        assert self.holders[dst] is None
        self.cache.move(seq.slot, dst, seq.kv_len)
        self.copies += 1
        self.holders[seq.slot] = None
        self.holders[dst] = seq
        seq.slot = dst

    def _swap(self, a: Sequence, b: Sequence) -> None:
        self.cache.swap(a.slot, a.kv_len, b.slot, b.kv_len)
        self.copies += 2
        self.holders[a.slot], self.holders[b.slot] = b, a
        a.slot, b.slot = b.slot, a.slot

    def compact(self) -> list[Sequence]:
        """Move decoders into slots [0, n); returns them in slot order."""
        decoders = [s for s in self.holders if s is not None and s.is_decoder]
        n = len(decoders)
        holes = [i for i in range(n) if not self._is_decoder_at(i)]
        movers = sorted((s for s in decoders if s.slot >= n), key=lambda s: -s.slot)
        for hole, seq in zip(holes, movers, strict=False):
            other = self.holders[hole]
            if other is None:
                self._move(seq, hole)
            else:
                self._swap(seq, other)
        while self.holders and self.holders[-1] is None:
            self.holders.pop()
        return self.holders[:n]  # type: ignore[return-value]

    def _is_decoder_at(self, i: int) -> bool:
        s = self.holders[i] if i < len(self.holders) else None
        return s is not None and s.is_decoder
