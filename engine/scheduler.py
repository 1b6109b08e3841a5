"""Who runs this step: admission by free pages, preemption by recompute, prefill planning.

    schedule():
      1. admit waiting sequences whose KV is all imported (one token left): they decode now
      2. give every decoder the page its next token goes in; when the pool is out of pages,
         preempt the newest running sequence (its pages are freed, full ones stay cached) and
         recompute it later from what the cache still holds
      3. plan prefill chunks FIFO with the pages left: with decodes running, a budget of
         `prefill_chunk` tokens (a longer prompt continues next step, so it never stalls them
         for long); with none, whole prompts. A waiting prompt whose first pages another
         prompt is computing waits for them (they are then in the cache), rather than
         computing them a second time in the same forward

The scheduler owns the queue and the order sequences entered the pool; the engine owns the
sequences themselves, the forward and sampling. Single-threaded, like the engine.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain

from engine.cold_kv import table_len
from engine.config import EngineConfig, EngineStats
from engine.page_pool import PagePool
from engine.paged_kv import PagedKV
from engine.sequence import Sequence

log = logging.getLogger(__name__)

LOGITS_CHUNK = 512  # prompt positions per forward when every position's logits are kept
# A waiting prompt that shares at least this many leading pages (64 tokens)
# with a prompt being computed waits for it, then takes those pages from the cache (SGLang's
# in-batch prefix caching). Shorter shares are not worth a wait: every chat shares its
# template's ~30-token system header.
SHARED_PREFIX_PAGES = 4


@dataclass
class Plan:
    """One step's work: decode rows (longest first) and (sequence, prompt tokens to feed)."""

    decoders: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decoders or self.prefill)


class Scheduler:
    """`fail(seq, err)` drops a sequence whose own import broke placement (the engine's)."""

    def __init__(self, config: EngineConfig, pool: PagePool, kv: PagedKV, stats: EngineStats,
                 max_model_len: int, fail: Callable[[Sequence, Exception], None]):
        self.config, self.pool, self.kv, self.stats = config, pool, kv, stats
        self.max_model_len = max_model_len
        self._fail = fail
        self.waiting: deque[Sequence] = deque()  # FIFO, not in the pool
        self.placed: list[Sequence] = []  # in the pool, in the order they entered it

    def schedule(self) -> Plan:
        self._admit_imported()
        decoders = self._reserve_decode()
        # Chunking exists to keep running decodes flowing. With none running (always so on a
        # prefill worker) prompts go in whole: from position 0 that is SDPA's maskless causal
        # kernel, ~2x faster on CPU than chunks over a cached prefix with explicit masks.
        budget = self.config.prefill_chunk if decoders else self.max_model_len
        planned = self._plan_prefill(budget, whole=not decoders)
        while not decoders and not planned and self._stalled():
            # Prompts part-way in hold every page and none can go on: give the oldest room.
            self.preempt(self._newest_running())
            planned = self._plan_prefill(budget, whole=True)
        return Plan(decoders, planned)

    def add_placed(self, seq: Sequence) -> None:
        """A fork that shares its parent's pages: already in the pool."""
        seq.placed = True
        self.placed.append(seq)

    def requeue(self, seq: Sequence) -> None:
        """Back to the front of the queue (a fork of a preempted parent recomputes too)."""
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget seq wherever it is; the caller frees its pages."""
        if seq.placed:
            self.placed.remove(seq)
            seq.placed = False
        if seq in self.waiting:
            self.waiting.remove(seq)

    # --- admission and preemption ---------------------------------------------------------------

    def _running(self) -> int:
        return sum(1 for s in self.placed if not s.done)

    def _stalled(self) -> bool:
        """Sequences hold pages, yet none decodes next step (nothing was planned either)."""
        running = [s for s in self.placed if not s.done]
        return bool(running) and not any(s.is_decoder for s in running)

    def _admit_imported(self) -> None:
        """Waiting sequences with one token left need no prefill: place them to decode."""
        for seq in [s for s in self.waiting if s.todo == 1]:
            if self._running() >= self.config.max_slots or self._try_place(seq) is False:
                return

    def _try_place(self, seq: Sequence) -> bool | None:
        """_place; None if its import did not go in (that fails `seq` alone)."""
        try:
            return self._place(seq)
        except Exception as e:
            self._fail(seq, e)
            return None

    def _place(self, seq: Sequence) -> bool:
        """Move a waiting sequence into the pool (PagedKV.place). False (and nothing taken)
        when the pool lacks the pages."""
        reused = self.kv.place(seq)
        if reused is None:
            return False
        self.waiting.remove(seq)
        self.add_placed(seq)
        self.stats.prefix_device_tokens += reused[0]
        self.stats.prefix_store_tokens += reused[1]
        if not seq.sampled:
            seq.reused = seq.kv_len
        return True

    def _reserve_decode(self) -> list[Sequence]:
        """Every decoder's page for its next token, oldest first. While the pool is out of
        pages, the running sequence with the most pages that can go cold sends some there (a
        copy, where a preemption would recompute it all), else the newest running sequence is
        preempted. Returns the decoders, longest first."""
        decoders = []
        for seq in [s for s in self.placed if s.is_decoder]:
            if not seq.placed:
                continue  # preempted for an older one in this loop
            if self.kv.cold is not None:
                self.kv.cold.fit(seq, 1)
            while self.kv.pages_needed(seq, seq.kv_len + 1) > self.pool.num_free:
                if self._shrink_one():
                    continue
                victim = self._newest_running()
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.placed:
                self.kv.grow(seq, seq.kv_len + 1)
                decoders.append(seq)
        decoders.sort(key=lambda s: -s.kv_len)
        return decoders

    def _shrink_one(self) -> bool:
        """Send cold some pages of the running sequence with the most that can go."""
        cold = self.kv.cold
        if cold is None:
            return False
        movable = {s: cold.movable(s) for s in self.placed if not s.done}
        seq = max(movable, key=movable.get, default=None)
        if seq is None or movable[seq] == 0:
            return False
        self.stats.kv_shrinks += 1
        cold.shrink(seq, cold.evict_unit)
        return True

    def _newest_running(self) -> Sequence:
        return next(s for s in reversed(self.placed) if not s.done)

    def preempt(self, seq: Sequence) -> None:
        """Take seq out of the pool to the front of the queue. Its full pages stay cached, so
        it resumes from what is still there when it is placed again, recomputing the rest."""
        log.info("preempting %s (%d tokens of KV)", seq.seq_id, seq.kv_len)
        self.kv.free(seq)
        self.placed.remove(seq)
        seq.placed, seq.kv_len = False, 0
        if seq.prompt_lps is not None:
            seq.prompt_lps = [None]  # prompt logprobs are collected again from position 0
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    # --- prefill planning -----------------------------------------------------------------------

    def _plan_prefill(self, budget: int, whole: bool) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to feed) for this step's forward, FIFO, up to `budget` tokens in
        all and the pages free. A prompt cut short continues next step, first in line; with
        `whole`, a prompt that does not fit the budget waits for a step of its own instead."""
        planned: list[tuple[Sequence, int]] = []
        started = [s for s in self.placed if not s.done and s.todo > 1]
        for seq in [*started, *self.waiting]:
            if budget <= 0:
                break
            if not seq.placed:
                if self._shares_prefix(seq, started, planned):
                    self.stats.shared_prefix_waits += 1
                    continue
                if whole and planned and seq.todo > budget:
                    break
                if self._running() >= self.config.max_slots:
                    break
                placed = self._try_place(seq)
                if placed is None:
                    continue
                if not placed:
                    break
                if seq.todo == 1:
                    continue  # fully cached or imported: it decodes next step
            n = min(budget, seq.todo, self._chunk_cap(seq, planned))
            if self.kv.cold is not None:
                n = self.kv.cold.fit(seq, n)
            n = min(n, self._room(seq))
            if n <= 0:
                break
            self.kv.grow(seq, seq.kv_len + n)
            planned.append((seq, n))
            budget -= n
            if n < seq.todo:
                break  # cut short: it goes first next step
        return planned

    def _shares_prefix(self, seq: Sequence, started: list[Sequence],
                       planned: list[tuple[Sequence, int]]) -> bool:
        """seq's first SHARED_PREFIX_PAGES pages are among those a prompt is computing now.
        Digests are chained, so one equal digest means every page before it is equal too (and
        the cache salt is in the chain: tenants never wait on each other)."""
        k, P = SHARED_PREFIX_PAGES, self.config.page_size
        if not self.kv.caching or seq.kv_len >= k * P or (len(seq.token_ids) - 1) // P < k:
            return False  # nothing to gain: an import holds those pages, or it is too short
        mine = self.kv.digests(seq, k)[-1]
        computing = chain(started, (s for s, _ in planned))  # built only past the checks above
        return any(len(s.token_ids) >= k * P and self.kv.digests(s, k)[-1] == mine
                   for s in computing if s is not seq)

    def _room(self, seq: Sequence) -> int:
        """Tokens seq can feed now: the rest of its own pages, then the pool's free ones."""
        free = self.pool.num_free - self.kv.must_copy(seq)
        if free < 0:
            return 0
        own = len(seq.pages) * self.config.page_size - table_len(seq)
        return own + free * self.config.page_size

    @staticmethod
    def _chunk_cap(seq: Sequence, planned: list[tuple[Sequence, int]]) -> int:
        """Prompt logprobs need every position's logits: [n, V] fp32 per forward, 1.6 GB for
        an 8k prompt at V = 49152. Fed LOGITS_CHUNK at a time, one such prompt per forward,
        it is 100 MB (the masked chunks cost ~2x the one-pass kernel, only for these)."""
        if seq.prompt_lps is None:
            return 1 << 62
        return 0 if any(s.prompt_lps is not None for s, _ in planned) else LOGITS_CHUNK
