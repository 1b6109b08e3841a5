"""The engine: continuous batching over a slot KV cache, one scheduler iteration per step().

    step():
      1. retire sequences that finished last step (their KV stayed readable until now)
      2. admit waiting sequences whose KV is all imported (one token left): they decode now
      3. compact: decoding sequences into slots [0, n)
      4. plan prefill chunks FIFO: with decodes running, a budget of `prefill_chunk` tokens (a
         longer prompt continues next step, so it never stalls them for long); with none,
         whole prompts
      5. one forward over both (engine/step_plan.py): the decode rows of slots [0, n) and the
         chunks ride through the model's weights together; sample, emit

Single-threaded by contract: one owner thread calls every method (see engine/runner.py), so
there are no locks. Sequence state is counters (see engine/sequence.py).
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from engine.cache import SlotKVCache, blocks_to_flat, flat_to_blocks
from engine.config import EngineConfig, EngineStats, default_max_len, eos_ids
from engine.forward import Forward
from engine.intake import check_params, check_request, common_prefix, trim_prefix
from engine.kv_layout import KVLayout
from engine.loader import LoadedModel
from engine.sampler import Sampled, prompt_logprobs, sample
from engine.sampling_params import SamplingParams
from engine.sequence import SeqRequest, Sequence, TokenEvent, stop_ids_for
from engine.slots import SlotTable
from engine.step_plan import Chunk

__all__ = ["Engine", "EngineConfig", "EngineStats", "SeqRequest", "TokenEvent"]

log = logging.getLogger(__name__)

LOGITS_CHUNK = 512  # prompt positions per forward when every position's logits are kept


class Engine:
    """Runs sequences of one model: add() queues, step() advances all of them by one iteration
    and returns the sampled tokens, abort()/release() forget them. A finished sequence's KV
    stays readable (kv_len, export_kv, export_blocks) until the next step() or add(), so an
    event hook can export it; a prefill_only sequence keeps it until release(). The last
    finished sequence's KV then stays in its slot for a next one to reuse (see _retain). A
    sequence whose own request breaks a step is dropped alone and reported by take_failed().

    Not thread-safe: one thread owns the engine (see engine/runner.py). `num_waiting` is safe
    to read from other threads (a len()).
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.loaded = loaded
        self.max_model_len = config.max_model_len or default_max_len(loaded.config)
        self.layout = KVLayout.from_config(loaded.config, config.block_size, loaded.dtype)
        self.eos_token_ids = eos_ids(loaded.model)
        self._cache = SlotKVCache(self.layout, config.max_slots, self.max_model_len, loaded.device)
        self._slots = SlotTable(self._cache)
        self._fwd = Forward(loaded.model, self._cache)
        self._seqs: dict[str, Sequence] = {}
        self._waiting: deque[Sequence] = deque()  # FIFO, no slot yet
        self._prefilling: Sequence | None = None  # mid-prefill across steps (at most one)
        self._done: list[Sequence] = []  # emitted their last event this step
        # Dropped by a failure of their own (see _fail), until take_failed() reports them.
        self._failed: list[tuple[str, Exception]] = []
        # The last finished sequence, KV still in its slot (see _retire_done); not in _seqs.
        self._retained: Sequence | None = None
        self._pending: dict[str, Sequence] = {}  # fork child id -> parent, until spawned
        self._stats = EngineStats()
        self._gen = torch.Generator(device=loaded.device)
        if config.seed is not None:
            self._gen.manual_seed(config.seed)
        else:
            self._gen.seed()
        log.info("engine: %s, max_slots=%d, max_model_len=%d, block=%d, prefill_chunk=%d",
                 loaded.name, config.max_slots, self.max_model_len, config.block_size,
                 config.prefill_chunk)

    # --- public API ---------------------------------------------------------------------------

    def add(self, req: SeqRequest) -> None:
        """Queue a sequence. Raises ValueError on a malformed request (nothing is queued).

        The id of a sequence that finished (and is not an unreleased prefill_only) may be reused
        at once. Last step's finished sequences are retired first, so the last of them can
        lend this one its KV (see _retain).
        """
        self._retire_done()  # also frees a finished sequence's id for reuse
        if req.seq_id in self._seqs or req.seq_id in self._pending:
            raise ValueError(f"duplicate seq_id {req.seq_id!r}")
        self.check(req)
        p = req.params
        seq = Sequence(req.seq_id, list(req.token_ids), req.num_prompt_tokens, p,
                       stop_ids_for(p, self.eos_token_ids), prefill_only=req.prefill_only,
                       cache_salt=req.cache_salt)
        if p.prompt_logprobs is not None:
            seq.prompt_lps = [None]  # needs every prompt position's logits: full prefill
        else:
            if req.prefix_kv is not None and req.prefix_len > 0:
                # Keep one token to feed: its logits give the next token.
                seq.kv_len = min(req.prefix_len, len(seq.token_ids) - 1)
                seq.held_blocks, seq.held_flat = trim_prefix(
                    req.prefix_kv, req.prefix_tail, seq.kv_len, self.layout)
            self._adopt_retained(seq)
        seq.reused = seq.kv_len
        self._seqs[seq.seq_id] = seq
        self._waiting.append(seq)

    def check(self, req: SeqRequest) -> None:
        """Raise engine.intake.InvalidRequest (a ValueError) on a request add() would refuse.
        Reads only fixed configuration, so any thread may call it: a worker does, to answer
        400 before it starts streaming."""
        check_request(req, self.layout, self.loaded.config.vocab_size, self.max_model_len)

    def check_params(self, params: SamplingParams) -> None:
        """check() for a fork's parameters (its tokens are its parent's): any thread."""
        check_params(params, self.loaded.config.vocab_size)

    def take_failed(self) -> list[tuple[str, Exception]]:
        """(seq_id, error) of the sequences a step dropped for a failure of their own (an
        import that did not fit its slot, sampling that raised for their row), since the last
        call. They emit no further events; every other sequence carried on."""
        failed, self._failed = self._failed, []
        return failed

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One scheduler iteration. Returns the tokens sampled in it, in no promised order."""
        self._stats.steps += 1
        self._retire_done()
        self._admit_imported()
        decoders = self._slots.compact()
        # Chunking exists to keep running decodes flowing. With none running (always so on a
        # prefill worker) prompts go in whole: from position 0 that is SDPA's maskless causal
        # kernel, ~2x faster on CPU than chunks over a cached prefix with explicit masks.
        budget = self.config.prefill_chunk if decoders else self.max_model_len
        planned = self._plan_prefill(budget, whole=not decoders)
        if not decoders and not planned:
            return []
        return self._forward(decoders, planned)

    def has_work(self) -> bool:
        return any(not s.done for s in self._seqs.values())

    def abort(self, seq_id: str) -> None:
        """Forget a sequence (any state) and free its slot. Unknown ids are ignored."""
        parent = self._pending.pop(seq_id, None)
        if parent is not None:
            parent.forks = [f for f in parent.forks if f[0] != seq_id]
            return
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self._drop(seq)

    def release(self, seq_id: str) -> None:
        """Drop a finished prefill_only sequence and its KV (same as abort)."""
        self.abort(seq_id)

    @torch.inference_mode()
    def fork(self, parent_id: str, child_id: str, params: SamplingParams) -> None:
        """Start child_id as a copy of parent_id's state, sharing its computed KV (copied).

        Before the parent has sampled here, the child is spawned at the parent's next sample
        and draws its own token from the same logits (the n > 1 case: the prompt is computed
        once). After, it copies the parent's tokens as they are and continues from there. The
        children of a prefill_only parent only draw their first token: they hold no KV (the
        parent's is the prompt's) and end with it, like the parent.
        """
        parent = self._seqs[parent_id]
        if child_id in self._seqs or child_id in self._pending:
            raise ValueError(f"duplicate seq_id {child_id!r}")
        self.check_params(params)
        if parent.sampled or parent.done:
            self._spawn(parent, child_id, params)
        else:
            parent.forks.append((child_id, params))
            self._pending[child_id] = parent

    def kv_len(self, seq_id: str) -> int:
        return self._seqs[seq_id].kv_len

    @torch.no_grad()  # not inference_mode: callers get ordinary tensors they may modify
    def export_kv(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) as a new tensor [L, 2, H, end - start, D] on the engine device."""
        seq = self._seqs[seq_id]
        assert 0 <= start <= end <= seq.kv_len, (start, end, seq.kv_len)
        return self._kv_view(seq)[:, :, :, start:end].clone()

    @torch.no_grad()
    def export_blocks(self, seq_id: str, first: int, count: int) -> torch.Tensor:
        """Full blocks [first, first + count) as [count, L, 2, H, B, D] on CPU."""
        seq = self._seqs[seq_id]
        B = self.layout.block_size
        assert first >= 0 and (first + count) * B <= seq.kv_len, (first, count, seq.kv_len)
        flat = self._kv_view(seq)[:, :, :, first * B : (first + count) * B]
        return flat_to_blocks(flat, B).cpu()

    @property
    def stats(self) -> EngineStats:
        self._stats.kv_copies = self._slots.copies
        return self._stats

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return sum(1 for s in self._seqs.values() if not s.done) - len(self._waiting)

    # --- scheduling ---------------------------------------------------------------------------

    @torch.inference_mode()  # also called from add(): slot copies need it either way
    def _retire_done(self) -> None:
        """Free last step's finished sequences (keeping the last one's KV resident); park
        unreleased prefill_only ones off-slot."""
        for seq in self._done:
            if self._seqs.get(seq.seq_id) is not seq:
                continue  # aborted or released meanwhile
            if seq.prefill_only:
                if seq.slot >= 0:
                    seq.held_blocks, seq.held_flat = None, self._kv_view(seq).clone()
                    self._slots.free(seq)
            elif self.config.retain_finished and seq.slot >= 0 and seq.kv_len >= (
                    self.layout.block_size):
                self._retain(seq)
            else:
                self._drop(seq)
        self._done.clear()
        if self._slots.num_held == (self._retained is not None):
            self._shrink()

    def _retain(self, seq: Sequence) -> None:
        """Keep a finished sequence's slot, like a one-entry prefix cache of the last chat:
        the next turn, or the next question on the same document, reuses its KV token by token
        with no store load or copy (what a paged cache's prefix caching gives vLLM)."""
        self._drop(seq, free_slot=False)
        if self._retained is not None:
            self._evict_retained()
        self._retained = seq

    def _evict_retained(self) -> None:
        seq, self._retained = self._retained, None
        self._slots.free(seq)

    def _adopt_retained(self, seq: Sequence) -> None:
        """Start seq in the retained slot when that reuses at least as many tokens as its
        store import would (same tenant only: the salt is part of the match)."""
        old = self._retained
        if old is None or old.cache_salt != seq.cache_salt:
            return
        n = common_prefix(old.token_ids, seq.token_ids, min(old.kv_len, len(seq.token_ids) - 1))
        # Under a block (chats share their template's first tokens) reuse would only trade the
        # maskless prefill from position 0 for a slower masked one.
        if n < max(seq.kv_len, self.layout.block_size):
            return
        self._retained = None
        self._slots.hand_over(old, seq)
        seq.kv_len = n
        seq.held_blocks = seq.held_flat = None

    def _has_room(self) -> bool:
        """Is a slot free? The retained sequence gives way rather than refuse a slot or make
        the cache grow (growth zero-fills slots x capacity: 0.19 GB per 4k-token slot)."""
        if self._retained is not None and self._slots.num_held >= self._cache.num_slots:
            self._evict_retained()
        return self._slots.has_free()

    def _shrink(self) -> None:
        """Idle: give back the slots a burst grew, keeping the retained KV (in slot 0)."""
        keep = self._retained
        if keep is not None and keep.slot != 0:
            self._slots.move_to(keep, 0)
        self._cache.reset(keep=keep.kv_len if keep is not None else 0)

    def _admit_imported(self) -> None:
        """Waiting sequences with one token left need no prefill: give them slots to decode."""
        for seq in [s for s in self._waiting if s.todo == 1]:
            if seq.slot < 0 and not self._has_room():
                return
            self._try_place(seq)

    def _try_place(self, seq: Sequence) -> bool:
        """_place, failing only `seq` if its import does not go in (the copy touches its own
        slot only, and a cache growth swaps the tensor in only once it is complete)."""
        try:
            self._place(seq)
        except Exception as e:
            self._fail(seq, e)
            return False
        return True

    def _place(self, seq: Sequence) -> None:
        """Move a waiting sequence into a free slot (unless it adopted one), copying in any KV
        it holds."""
        self._waiting.remove(seq)
        if seq.slot < 0:
            self._slots.alloc(seq)
        if seq.held_blocks is not None:
            self._cache.write_blocks(seq.slot, seq.held_blocks)
        if seq.held_flat is not None:
            blocks = 0 if seq.held_blocks is None else len(seq.held_blocks)
            self._cache.write(seq.slot, blocks * self.layout.block_size, seq.held_flat)
        seq.held_blocks = seq.held_flat = None

    def _plan_prefill(self, budget: int, whole: bool) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to feed) for this step's forward, FIFO, up to `budget` tokens in
        all. A prompt cut short continues next step (as `_prefilling`, first in line); with
        `whole`, a prompt that does not fit waits for a step of its own instead."""
        planned: list[tuple[Sequence, int]] = []
        first = [self._prefilling] if self._prefilling else []
        for seq in [*first, *self._waiting]:
            if budget <= 0:
                break
            if seq is not self._prefilling:
                if whole and planned and seq.todo > budget:
                    break
                if seq.slot < 0 and not self._has_room():
                    break
                if not self._try_place(seq):
                    continue
                if seq.todo == 1:
                    continue  # an import: it joins the next decode step
            n = min(budget, seq.todo, self._chunk_cap(seq, planned))
            if n <= 0:
                break
            planned.append((seq, n))
            budget -= n
            if n < seq.todo:
                break  # cut short: at most one sequence is mid-prefill
        return planned

    @staticmethod
    def _chunk_cap(seq: Sequence, planned: list[tuple[Sequence, int]]) -> int:
        """Prompt logprobs need every position's logits: [n, V] fp32 per forward, 1.6 GB for
        an 8k prompt at V = 49152. Fed LOGITS_CHUNK at a time, one such prompt per forward,
        it is 100 MB (the masked chunks cost ~2x the one-pass kernel, only for these)."""
        if seq.prompt_lps is None:
            return 1 << 62
        return 0 if any(s.prompt_lps is not None for s, _ in planned) else LOGITS_CHUNK

    def _forward(self, decoders: list[Sequence], planned: list[tuple[Sequence, int]]
                 ) -> list[TokenEvent]:
        """One forward over the decode rows and the planned prompt chunks; sample and emit."""
        chunks = [Chunk(seq.slot, seq.kv_len, seq.token_ids[seq.kv_len : seq.kv_len + n],
                        keep=self._keep(seq, n)) for seq, n in planned]
        logits = self._fwd.step([s.token_ids[s.kv_len] for s in decoders],
                                [s.kv_len for s in decoders], chunks)  # [rows, V]
        for s in decoders:
            s.kv_len += 1
        self._stats.decode_tokens += len(decoders)
        samplers, rows, r = list(decoders), list(range(len(decoders))), len(decoders)
        for (seq, n), chunk in zip(planned, chunks, strict=True):
            self._fed_prompt(seq, n, logits[r : r + chunk.keep])
            r += chunk.keep
            if seq.todo == 0:
                samplers.append(seq)
                rows.append(r - 1)
        last = planned[-1][0] if planned else None
        self._prefilling = last if last is not None and last.todo > 1 else None
        if not samplers:
            return []
        # rows ascend, so as many rows as logits means all of them, in order: no copy
        return self._emit(samplers, logits if len(rows) == len(logits) else logits[rows])

    def _keep(self, seq: Sequence, n: int) -> int:
        """Logits a chunk needs: all positions for prompt logprobs, else the next token's."""
        if seq.prompt_lps is not None and seq.kv_len < seq.num_prompt_tokens - 1:
            return n
        return 1 if seq.todo == n else 0

    def _fed_prompt(self, seq: Sequence, n: int, logits: torch.Tensor) -> None:
        """Account n prompt tokens fed; logits [keep, V] are their positions' (see _keep)."""
        start, P = seq.kv_len, seq.num_prompt_tokens
        seq.kv_len += n
        self._stats.prefill_tokens += n
        if seq.prompt_lps is not None and start < P - 1:
            # positions start.. predict tokens start+1..; only prompt tokens get an entry
            targets = seq.token_ids[start + 1 : min(start + n, P - 1) + 1]
            seq.prompt_lps += prompt_logprobs(logits, targets, seq.params.prompt_logprobs)

    # --- sampling and bookkeeping -------------------------------------------------------------

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        """Sample a token per sequence (and per child forked off it); logits [len(seqs), V]."""
        rows, src = [], []
        for i, seq in enumerate(seqs):
            rows.append(seq)
            src.append(i)
            for child_id, params in seq.forks:
                del self._pending[child_id]
                rows.append(self._spawn(seq, child_id, params))
                src.append(i)
            seq.forks = []
        if len(rows) != len(seqs):
            logits = logits[src]
        try:
            outs = sample(logits, [s.sample_row() for s in rows], self._gen)
        except Exception:
            log.exception("batched sampling failed; sampling %d rows one by one", len(rows))
            return self._emit_each(rows, logits)
        return [self._append(s, o) for s, o in zip(rows, outs, strict=False)]

    def _emit_each(self, rows: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        """Sample row by row (logits [len(rows), V]): a row that raises again fails alone."""
        events = []
        for i, seq in enumerate(rows):
            try:
                [out] = sample(logits[i : i + 1], [seq.sample_row()], self._gen)
            except Exception as e:
                self._fail(seq, e)
                continue
            events.append(self._append(seq, out))
        return events

    def _fail(self, seq: Sequence, err: Exception) -> None:
        """Drop one sequence whose own request broke a step; take_failed() reports it."""
        log.warning("sequence %s failed: %r", seq.seq_id, err)
        self._drop(seq)
        self._failed.append((seq.seq_id, err))

    def _append(self, seq: Sequence, out: Sampled) -> TokenEvent:
        seq.token_ids.append(out.token_id)
        seq.sampled = True
        reason = seq.finish_check(out.token_id, self.max_model_len)
        ev = TokenEvent(out.token_id, out.logprob, out.top_logprobs, reason, seq_id=seq.seq_id)
        ev.num_cached_tokens, seq.reused = seq.reused, None
        if seq.prompt_lps is not None:
            ev.prompt_logprobs, seq.prompt_lps = seq.prompt_lps, None
        if reason is not None or seq.prefill_only:
            seq.done, seq.finish_reason = True, reason
            self._done.append(seq)
        return ev

    def _spawn(self, parent: Sequence, child_id: str, params: SamplingParams) -> Sequence:
        """A new sequence with the parent's tokens and a copy of its computed KV."""
        child = Sequence(child_id, list(parent.token_ids), parent.num_prompt_tokens, params,
                         stop_ids_for(params, self.eos_token_ids), parent.prefill_only,
                         parent.cache_salt, kv_len=parent.kv_len, sampled=True)
        self._seqs[child_id] = child
        if not parent.sampled:  # an n > 1 sibling: the prompt's reuse and logprobs are its too
            child.reused, child.prompt_lps = parent.reused, parent.prompt_lps
        if parent.prefill_only:
            return child  # samples its first token and is done; the parent holds the prompt KV
        if parent.slot >= 0 and self._has_room():
            self._slots.alloc(child)
            self._cache.move(parent.slot, child.slot, parent.kv_len)
            self._slots.copies += 1
        else:  # no slot now: hold a copy and wait at the front of the queue
            child.held_flat = self._kv_view(parent).clone()
            self._waiting.appendleft(child)
        return child

    def _kv_view(self, seq: Sequence) -> torch.Tensor:
        """Tokens [0, kv_len) of a sequence, wherever they are: [L, 2, H, kv_len, D]."""
        if seq.slot >= 0:
            return self._cache.read(seq.slot, 0, seq.kv_len)
        parts = []
        if seq.held_blocks is not None:
            held = seq.held_blocks
            parts.append(blocks_to_flat(torch.stack(held) if isinstance(held, list) else held))
        if seq.held_flat is not None:
            parts.append(seq.held_flat)
        if not parts:  # waiting, nothing imported
            return self._cache.read(0, 0, 0)
        return torch.cat(parts, dim=3)[:, :, :, : seq.kv_len].to(self._cache.device)

    def _drop(self, seq: Sequence, free_slot: bool = True) -> None:
        del self._seqs[seq.seq_id]
        if seq.slot >= 0 and free_slot:
            self._slots.free(seq)
        if seq in self._waiting:  # a waiting sequence may hold an adopted slot
            self._waiting.remove(seq)
        if self._prefilling is seq:
            self._prefilling = None
        for child_id, _ in seq.forks:
            self._pending.pop(child_id, None)
        seq.held_blocks = seq.held_flat = None
