"""The engine: continuous batching over a paged KV pool, one scheduler iteration per step().

    step():
      1. retire sequences that finished last step (their KV stayed readable until now; their
         full pages stay in the pool as the prefix cache)
      2. schedule (engine/scheduler.py): admit, reserve decode pages (preempting when out),
         plan prefill chunks
      3. one forward over both (engine/step_plan.py): the decode rows and the chunks ride
         through the model's weights together; sample, emit

A sequence entering the pool first takes the longest run of its pages already cached there
(engine/paged_kv.py), then any longer prefix the store gave it.

Single-threaded by contract: one owner thread calls every method (see engine/runner.py), so
there are no locks. Sequence state is counters (see engine/sequence.py).
"""

from __future__ import annotations

import logging
import time

import torch

from engine.cold_kv import (
    ColdKV,
    ColdKVLost,
    ColdTier,
    segment_of,
    segment_tokens,
    table_len,
)
from engine.cold_stream import HELD, stream_reserve
from engine.config import EngineConfig, EngineStats, KVUsage, default_max_len, eos_ids
from engine.forward import Forward
from engine.grammar import Grammars, GuideError
from engine.guide_masks import GuideMasks, Masks
from engine.intake import InvalidRequest, check_params, check_request, trim_prefix
from engine.kv_budget import pool_pages
from engine.kv_layout import KVLayout, blocks_to_flat, flat_to_blocks
from engine.loader import LoadedModel
from engine.page_hash import chain_root
from engine.page_pool import PagePool
from engine.paged_kv import PagedKV
from engine.sampler import Sampled, SampleRow, prompt_logprobs, sample
from engine.sampling_params import SamplingParams
from engine.scheduler import Plan, Scheduler
from engine.sequence import SeqRequest, Sequence, TokenEvent, stop_ids_for
from engine.step_plan import Chunk

__all__ = ["Engine", "EngineConfig", "EngineStats", "SeqRequest", "TokenEvent"]

log = logging.getLogger(__name__)


class Engine:
    """Runs sequences of one model: add() queues, step() advances all of them by one iteration
    and returns the sampled tokens, abort()/release() forget them. A finished sequence's KV
    stays readable (kv_len, export_kv, export_blocks) until the next step() or add(), so an
    event hook can export it; a prefill_only sequence keeps it until release(). A sequence
    whose own request breaks a step is dropped alone and reported by take_failed().

    Not thread-safe: one thread owns the engine (see engine/runner.py). `num_waiting`,
    `kv_usage` and `cached_prefix_tokens` are safe to call from other threads.
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None,
                 cold_tier: ColdTier | None = None):
        self.config = config = config or EngineConfig()
        self.loaded = loaded
        self.max_model_len = config.max_model_len or default_max_len(loaded.config)
        quant = None if config.kv_dtype == "auto" else config.kv_dtype
        self.layout = KVLayout.from_config(loaded.config, config.block_size, loaded.dtype, quant)
        if config.block_size % config.page_size:
            raise ValueError(f"page_size {config.page_size} must divide the store's block_size "
                             f"{config.block_size}, so blocks move as whole pages")
        self.eos_token_ids = eos_ids(loaded.model)
        self.grammars = Grammars(loaded.tokenizer, loaded.config.vocab_size, self.eos_token_ids)
        self._masks = GuideMasks(self.grammars.vocab_size, overlap=loaded.device.type == "cuda")
        prefetch, segment, reserve = self._stream_plan(cold_tier is not None)
        # One longest prompt's pages are touched at start (see PagePool's docstring).
        self.pool = PagePool(self.layout, pool_pages(config, self.layout, loaded.device, reserve),
                             config.page_size, loaded.device,
                             prefault=-(-self.max_model_len // config.page_size))
        self._page_bytes = PagePool.page_bytes(self.layout, config.page_size)
        self.cold = None if cold_tier is None else ColdKV(
            cold_tier, self.pool, self._window_pages(), prefetch, segment)
        self._kv = PagedKV(self.pool, self._chain_root, config.prefix_caching, self.cold)
        self._fwd = Forward(loaded.model, self.pool, self.max_model_len, self.cold,
                            config.compile_decode)
        if self._fwd.compiled is not None:
            start = time.monotonic()
            self._fwd.compiled.warm_up()
            log.info("compiled the decode step in %.0f s", time.monotonic() - start)
        self._seqs: dict[str, Sequence] = {}
        self._done: list[Sequence] = []  # emitted their last event this step
        # Dropped by a failure of their own (see _fail), until take_failed() reports them.
        self._failed: list[tuple[str, Exception]] = []
        self._pending: dict[str, Sequence] = {}  # fork child id -> parent, until spawned
        self._stats = EngineStats()
        self._sched = Scheduler(config, self.pool, self._kv, self._stats, self.max_model_len,
                                self._fail)
        self._gen = torch.Generator(device=loaded.device)
        if config.seed is not None:
            self._gen.manual_seed(config.seed)
        else:
            self._gen.seed()
        log.info("engine: %s, max_slots=%d, max_model_len=%d, block=%d, prefill_chunk=%d, "
                 "kv pool %d pages x %d tokens (%.2f GB)", loaded.name, config.max_slots,
                 self.max_model_len, config.block_size, config.prefill_chunk,
                 self.pool.num_pages, config.page_size, self.pool.kv.nbytes / 1e9)

    def _stream_plan(self, cold: bool) -> tuple[bool, int, int]:
        """(prefetch, tokens per cold segment, bytes of the budget the stream reserves)."""
        config, device = self.config, self.loaded.device
        prefetch = device.type == "cuda" if config.cold_prefetch is None else config.cold_prefetch
        if not cold:
            return prefetch, 0, 0
        pages = pool_pages(config, self.layout, device)
        segment = segment_tokens(pages * config.page_size, self.layout.num_layers,
                                 HELD if prefetch else 1)
        return prefetch, segment, stream_reserve(self.layout, prefetch, segment)

    def _window_pages(self) -> int:
        P, pages = self.config.page_size, self.pool.num_pages
        if self.config.kv_window is None:
            return pages * 3 // 4
        if not P <= self.config.kv_window <= pages * P:
            raise ValueError(f"kv_window {self.config.kv_window} must be between a page and the "
                             f"pool's {pages * P} tokens")
        return self.config.kv_window // P

    def _chain_root(self, cache_salt: str) -> bytes:
        return chain_root(self.loaded.fingerprint, self.layout.name,
                          self.config.page_size, cache_salt)

    # --- public API ---------------------------------------------------------------------------

    def add(self, req: SeqRequest) -> None:
        """Queue a sequence. Raises ValueError on a malformed request (nothing is queued).

        The id of a sequence that finished (and is not an unreleased prefill_only) may be reused
        at once: last step's finished sequences are retired first.
        """
        self._retire_done()
        if req.seq_id in self._seqs or req.seq_id in self._pending:
            raise ValueError(f"duplicate seq_id {req.seq_id!r}")
        self.check(req)
        p = req.params
        seq = Sequence(req.seq_id, list(req.token_ids), req.num_prompt_tokens, p,
                       stop_ids_for(p, self.eos_token_ids), prefill_only=req.prefill_only,
                       cache_salt=req.cache_salt)
        seq.matcher = self._matcher(p, seq.token_ids[seq.num_prompt_tokens :])
        if p.prompt_logprobs is not None:
            seq.prompt_lps = [None]  # needs every prompt position's logits: full prefill
        elif req.prefix_kv is not None and req.prefix_len > 0:
            # Keep one token to feed: its logits give the next token.
            seq.kv_len = min(req.prefix_len, len(seq.token_ids) - 1)
            seq.held_start = req.prefix_start
            seq.held_blocks, seq.held_flat = trim_prefix(
                req.prefix_kv, req.prefix_tail, seq.kv_len - seq.held_start, self.layout)
        self._seqs[seq.seq_id] = seq
        self._sched.waiting.append(seq)

    def check(self, req: SeqRequest) -> None:
        """Raise engine.intake.InvalidRequest (a ValueError) on a request add() would refuse.
        Reads only fixed configuration, so any thread may call it: a worker does, to answer
        400 before it starts streaming."""
        check_request(req, self.layout, self.loaded.config.vocab_size, self.max_model_len)
        self._matcher(req.params, req.token_ids[req.num_prompt_tokens :])
        need = min(len(req.token_ids) + req.params.max_tokens, self.max_model_len)
        capacity = self.pool.num_pages * self.config.page_size
        if need > capacity and self.cold is None:  # with a cold tier, any length streams
            raise InvalidRequest(
                "max_tokens", f"{len(req.token_ids)} prompt tokens + max_tokens "
                f"{req.params.max_tokens} need {need} tokens of KV; this worker's KV pool "
                f"holds {capacity}", "context_length_exceeded")

    def check_params(self, params: SamplingParams) -> None:
        """check() for a fork's parameters (its tokens are its parent's): any thread."""
        check_params(params, self.loaded.config.vocab_size)
        self._matcher(params, [])

    def _matcher(self, params: SamplingParams, generated: list[int]):
        """The llguidance matcher of params.guide advanced over `generated`, or None. Raises
        InvalidRequest for a guide that does not compile or does not accept the tokens."""
        if params.guide is None:
            return None
        try:
            return self.grammars.matcher(params.guide, generated)
        except GuideError as exc:
            raise InvalidRequest("guide", f"invalid guide: {exc}") from None

    def cached_prefix_tokens(self, token_ids: list[int], cache_salt: str = "") -> int:
        """Leading tokens whose KV the pool holds now (full pages): advisory, any thread."""
        probe = Sequence("", token_ids, len(token_ids), SamplingParams(), frozenset(),
                         cache_salt=cache_salt)
        full = (len(token_ids) - 1) // self.config.page_size
        return len(self.pool.lookup(self._kv.digests(probe, full))) * self.config.page_size

    def take_failed(self) -> list[tuple[str, Exception]]:
        """(seq_id, error) of the sequences a step dropped for a failure of their own (an
        import that did not fit, sampling that raised for their row), since the last call.
        They emit no further events; every other sequence carried on."""
        failed, self._failed = self._failed, []
        return failed

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One scheduler iteration. Returns the tokens sampled in it, in no promised order."""
        self._stats.steps += 1
        self._retire_done()
        try:
            plan = self._sched.schedule()
            if not plan:
                return []
            self._fwd.stream_peak = 0
            resident = self.pool.num_referenced * self._page_bytes
            events = self._forward(plan)
            self._stats.kv_peak_bytes = max(self._stats.kv_peak_bytes,
                                            resident + self._fwd.stream_peak)
            return events
        except ColdKVLost as e:
            self._lost_cold(e)
            return []
        finally:
            if self.cold is not None:
                self._stats.kv_cold_tokens = self.cold.tokens_out

    def _lost_cold(self, err: ColdKVLost) -> None:
        """A cold segment is gone from its tier (evicted, a disk fault): the sequences whose
        span held it recompute from what the pool still caches. Every other sequence runs
        this step again: nothing it wrote was counted."""
        log.warning("%s; recomputing the sequences that held it", err)
        segment = segment_of(err.key)
        for seq in list(self._seqs.values()):
            if seq.cold is not None and any(g.key == segment for g in seq.cold.segments):
                self._sched.preempt(seq)

    def has_work(self) -> bool:
        return any(not s.done for s in self._seqs.values())

    def abort(self, seq_id: str) -> None:
        """Forget a sequence (any state) and free its pages. Unknown ids are ignored."""
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
        """Start child_id as a copy of parent_id's state, sharing its pages.

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

    def has(self, seq_id: str) -> bool:
        """Whether the sequence is still here (not finished, aborted or failed)."""
        return seq_id in self._seqs

    @torch.no_grad()  # not inference_mode: callers get ordinary tensors they may modify
    def export_kv(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) as a new tensor [L, 2, H, end - start, D] on the engine device."""
        seq = self._seqs[seq_id]
        assert 0 <= start <= end <= seq.kv_len, (start, end, seq.kv_len)
        if seq.placed:
            return self._kv.read(seq, start, end)
        return self._held_view(seq)[:, :, :, start:end].clone()

    @torch.no_grad()
    def export_blocks(self, seq_id: str, first: int, count: int) -> torch.Tensor:
        """Full blocks [first, first + count) as [count, L, 2, H, B, D] on CPU."""
        B, seq = self.layout.block_size, self._seqs[seq_id]
        assert first >= 0 and (first + count) * B <= seq.kv_len, (first, count, seq.kv_len)
        if seq.placed:
            return self._kv.read_blocks(seq, first, count, B).cpu()
        return flat_to_blocks(self.export_kv(seq_id, first * B, (first + count) * B), B).cpu()

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def kv_usage(self) -> KVUsage:
        """The pool's occupancy: ints and len()s only, so a metrics thread may read it."""
        pool = self.pool
        return KVUsage(pool.num_pages, pool.num_referenced, pool.num_cached, pool.page_size)

    @property
    def num_waiting(self) -> int:
        return len(self._sched.waiting)

    @property
    def num_running(self) -> int:
        return sum(1 for s in self._seqs.values() if not s.done) - self.num_waiting

    # --- stepping ------------------------------------------------------------------------------

    def _retire_done(self) -> None:
        """Free last step's finished sequences' pages (their full pages stay cached); an
        unreleased prefill_only one keeps its pages until release()."""
        for seq in self._done:
            if self._seqs.get(seq.seq_id) is seq and not seq.prefill_only:
                self._drop(seq)
        self._done.clear()

    def _forward(self, plan: Plan) -> list[TokenEvent]:
        """One forward over the decode rows and the planned prompt chunks; sample and emit."""
        decoders, planned = plan.decoders, plan.prefill
        chunks = [Chunk(seq.pages, table_len(seq), seq.token_ids[seq.kv_len : seq.kv_len + n],
                        keep=self._keep(seq, n), shift=seq.kv_len - table_len(seq),
                        cold=_cold_keys(seq)) for seq, n in planned]
        pending = self._masks.start(decoders, planned)
        try:
            logits = self._fwd.step([s.token_ids[s.kv_len] for s in decoders],
                                    [s.kv_len for s in decoders], [s.pages for s in decoders],
                                    chunks, [s.kv_len - table_len(s) for s in decoders],
                                    [_cold_keys(s) for s in decoders])  # [rows, V]
        except BaseException:
            self._masks.settle(pending)
            raise
        ready = self._masks.take(pending)
        for s in decoders:
            s.kv_len += 1
            self._kv.commit(s)
        self._stats.decode_tokens += len(decoders)
        samplers, rows, r = list(decoders), list(range(len(decoders))), len(decoders)
        for (seq, n), chunk in zip(planned, chunks, strict=True):
            self._fed_prompt(seq, n, logits[r : r + chunk.keep])
            r += chunk.keep
            if seq.todo == 0:
                samplers.append(seq)
                rows.append(r - 1)
        if not samplers:
            return []
        # rows ascend, so as many rows as logits means all of them, in order: no copy
        return self._emit(samplers, logits if len(rows) == len(logits) else logits[rows], ready)

    def _keep(self, seq: Sequence, n: int) -> int:
        """Logits a chunk needs: all positions for prompt logprobs, else the next token's."""
        if seq.prompt_lps is not None and seq.kv_len < seq.num_prompt_tokens - 1:
            return n
        return 1 if seq.todo == n else 0

    def _fed_prompt(self, seq: Sequence, n: int, logits: torch.Tensor) -> None:
        """Account n prompt tokens fed; logits [keep, V] are their positions' (see _keep)."""
        start, P = seq.kv_len, seq.num_prompt_tokens
        seq.kv_len += n
        self._kv.commit(seq)
        self._stats.prefill_tokens += n
        if seq.prompt_lps is not None and start < P - 1:
            # positions start.. predict tokens start+1..; only prompt tokens get an entry
            targets = seq.token_ids[start + 1 : min(start + n, P - 1) + 1]
            seq.prompt_lps += prompt_logprobs(logits, targets, seq.params.prompt_logprobs)

    # --- sampling and bookkeeping -------------------------------------------------------------

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor, ready: Masks
              ) -> list[TokenEvent]:
        """Sample a token per sequence (and per child forked off it); logits [len(seqs), V].
        `ready`: the guided rows' masks, computed during the forward."""
        rows, src = [], []
        for i, seq in enumerate(seqs):
            rows.append(seq)
            src.append(i)
            for child_id, params in seq.forks:
                del self._pending[child_id]
                rows.append(self._spawn(seq, child_id, params))
                src.append(i)
            seq.forks = []
        masks, broken = self._masks.complete(rows, ready)
        if broken:
            rows, src = self._drop_broken(rows, src, broken)
            if not rows:
                return []
        if broken or len(rows) != len(seqs):
            logits = logits[src]
        samples = [s.sample_row(self._masks.tensor(s, masks, logits.device)) for s in rows]
        try:
            outs = sample(logits, samples, self._gen)
        except Exception:
            log.exception("batched sampling failed; sampling %d rows one by one", len(rows))
            return self._emit_each(rows, samples, logits)
        return [self._append(s, o) for s, o in zip(rows, outs, strict=False)]

    def _drop_broken(self, rows: list[Sequence], src: list[int],
                     broken: list[tuple[Sequence, GuideError]]
                     ) -> tuple[list[Sequence], list[int]]:
        """Fail the rows whose guide broke (alone); the others go on."""
        for seq, err in broken:
            self._fail(seq, err)
        gone = {id(seq) for seq, _ in broken}
        keep = [i for i, seq in enumerate(rows) if id(seq) not in gone]
        return [rows[i] for i in keep], [src[i] for i in keep]

    def _emit_each(self, rows: list[Sequence], samples: list[SampleRow],
                   logits: torch.Tensor) -> list[TokenEvent]:
        """Sample row by row (logits [len(rows), V]): a row that raises again fails alone."""
        events = []
        for i, seq in enumerate(rows):
            try:
                [out] = sample(logits[i : i + 1], [samples[i]], self._gen)
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
        reason = seq.append(out.token_id, self.max_model_len)
        ev = TokenEvent(out.token_id, out.logprob, out.top_logprobs, reason, seq_id=seq.seq_id)
        ev.num_cached_tokens, seq.reused = seq.reused, None
        if seq.prompt_lps is not None:
            ev.prompt_logprobs, seq.prompt_lps = seq.prompt_lps, None
        if reason is not None or seq.prefill_only:
            seq.done, seq.finish_reason = True, reason
            self._done.append(seq)
        return ev

    def _spawn(self, parent: Sequence, child_id: str, params: SamplingParams) -> Sequence:
        """A new sequence with the parent's tokens, sharing its pages (copy-on-write)."""
        child = Sequence(child_id, list(parent.token_ids), parent.num_prompt_tokens, params,
                         stop_ids_for(params, self.eos_token_ids), parent.prefill_only,
                         parent.cache_salt, kv_len=parent.kv_len, sampled=True)
        child.matcher = self._matcher(params, child.token_ids[child.num_prompt_tokens :])
        self._seqs[child_id] = child
        if not parent.sampled:  # an n > 1 sibling: the prompt's reuse and logprobs are its too
            child.reused, child.prompt_lps = parent.reused, parent.prompt_lps
        if parent.prefill_only:
            return child  # samples its first token and is done; the parent holds the prompt KV
        if parent.placed:
            self._kv.fork(parent, child)
            self._sched.add_placed(child)
        else:  # the parent was preempted: the child recomputes too
            child.kv_len = 0
            self._sched.requeue(child)
        return child

    def _held_view(self, seq: Sequence) -> torch.Tensor:
        """Tokens [0, kv_len) of a waiting sequence's held import: [L, 2, H, kv_len, D]."""
        if seq.held_start:
            raise RuntimeError(f"{seq.seq_id}: its first {seq.held_start} tokens are in no "
                               "import (the pool had them); export it once admitted")
        parts = []
        if seq.held_blocks is not None:
            held = seq.held_blocks
            parts.append(blocks_to_flat(torch.stack(held) if isinstance(held, list) else held))
        if seq.held_flat is not None:
            parts.append(seq.held_flat)
        if not parts:  # waiting, nothing imported
            return self.pool.kv.new_zeros(self.layout.num_layers, 2, self.layout.num_kv_heads,
                                          0, self.layout.row)
        return torch.cat(parts, dim=3)[:, :, :, : seq.kv_len].to(self.pool.kv.device)

    def _drop(self, seq: Sequence) -> None:
        del self._seqs[seq.seq_id]
        self._kv.free(seq)  # also the pages of an import that failed half-way in
        self._sched.remove(seq)
        for child_id, _ in seq.forks:
            self._pending.pop(child_id, None)
        seq.held_blocks = seq.held_flat = None


def _cold_keys(seq: Sequence) -> list[str] | None:
    return None if seq.cold is None else [s.key for s in seq.cold.segments]
