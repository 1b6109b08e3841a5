"""What prefill and decode workers share: the loaded model, engine thread, KV store, admission
and counters (a sequence's start is worker/sequence.py, the app skeleton worker/app.py)."""

from __future__ import annotations

import base64
import logging
import os
import threading
import uuid
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import torch
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from engine.engine import Engine, EngineConfig
from engine.loader import LoadedModel, load_model
from engine.registry import resolve_model
from engine.resident_filter import HASHES
from engine.runner import EngineRunner
from kvstore import KeyNamespace, build_store
from kvstore.tiered import TieredStore
from wire.internal_api import KVSummary, WorkerHealth
from wire.streaming import with_keepalive
from worker.admission import Admission, Ticket
from worker.cold_tier import StoreColdTier
from worker.metrics import (
    EngineCollector,
    EngineReading,
    HandoffMetrics,
    QueueMetrics,
    StoreCollector,
    StoreMetrics,
)
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerCounters:
    """Monotonic counters that tests and operators read from /health (and /metrics)."""

    requests_total: int = 0
    prompt_tokens_computed_total: int = 0  # prompt tokens whose KV this worker computed
    prefix_tokens_loaded_total: int = 0  # tokens whose KV came from the store instead
    # Tokens fed when a sequence was admitted (prompt rest + carried generated tokens): 1 for a
    # plain handoff, under a block for a failover resume that found the dead worker's blocks.
    admit_tokens_computed_total: int = 0
    blocks_loaded_total: int = 0
    blocks_written_total: int = 0
    # Not queued because max_pending_writes were pending: never cached, recomputed if needed.
    blocks_write_dropped_total: int = 0
    requests_refused_total: int = 0  # answered 429 (full) or 503 (draining)
    requests_invalid_total: int = 0  # answered 400: a request the engine would refuse


# One step this long is taken for a hung engine. The longest single steps measured are a long
# prompt's chunks: an 8k-token prompt's whole prefill, several steps, took 33.6 s on 2 vCPUs
# (docs/BENCHMARKS.md, "Context beyond the KV budget"). A hang is then noticed after this
# plus the router's worker_timeout_s.
ENGINE_STALL_S = 60.0


@dataclass
class Worker:
    settings: WorkerSettings
    lm: LoadedModel
    engine: Engine
    runner: EngineRunner
    store: TieredStore
    registry: CollectorRegistry
    handoff: HandoffMetrics
    admission: Admission
    cold: StoreColdTier | None = None  # the engine's cold tier (worker/cold_tier.py)
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    writer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="kv-writer")
    )
    pending_writes: int = 0  # queued or running on `writer`, at most max_pending_writes
    # Who this process is, whatever URL reaches it (a restart is another instance).
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _pending_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def block_size(self) -> int:
        return self.engine.layout.block_size

    def namespace(self, cache_salt: str) -> KeyNamespace:
        return KeyNamespace(
            self.lm.fingerprint, self.engine.layout.name, self.block_size, cache_salt
        )

    def keepalive(self, lines: AsyncGenerator[str]) -> AsyncGenerator[str]:
        """A reply stream with keepalive lines while its engine makes progress (a request
        queued or being computed is alive). An engine stuck in one step for ENGINE_STALL_S
        stops them, so the router's read timeout fails its calls over as before."""
        every = self.settings.stream_keepalive_s
        stall = max(every, ENGINE_STALL_S)
        return with_keepalive(lines, every, alive=lambda: self.runner.turned_within(stall))

    def write_blocks(self, items: dict[str, torch.Tensor], ttl_s: int | None = None):
        """Queue a store write off the engine thread; returns its Future (None: dropped)."""
        return self.submit_write(len(items), self.store.put_many, items, ttl_s=ttl_s)

    def submit_write(self, blocks: int, fn: Callable, *args, **kwargs) -> Future | None:
        """Run a store write of `blocks` blocks on a writer thread, unless max_pending_writes
        are queued or running already: then drop it (counted) and return None. A dropped
        block is only a cache miss later, while an unbounded backlog would hold every block's
        tensors for as long as the store stays slow."""
        with self._pending_lock:
            full = self.pending_writes >= self.settings.max_pending_writes
            if full:
                self.counters.blocks_write_dropped_total += blocks
            else:
                self.pending_writes += 1
                self.counters.blocks_written_total += blocks
        if full:
            return None
        try:
            fut = self.writer.submit(fn, *args, **kwargs)
        except BaseException:  # the executor is shut down: nothing was queued
            self._write_done(None)
            raise
        fut.add_done_callback(self._write_done)
        return fut

    def _write_done(self, _: Future | None) -> None:
        with self._pending_lock:
            self.pending_writes -= 1

    def try_admit(self, resume: bool = False, units: int = 1) -> Ticket | JSONResponse:
        """A ticket to hold while serving the request, or the 429/503 to answer with."""
        refusal = self.admission.refusal(resume, units)
        if refusal is not None:
            self.counters.requests_refused_total += 1
            return refusal
        return self.admission.admit(units)

    def load(self) -> tuple[int, int]:
        """(running, waiting) from other threads: only len() of containers, which is atomic;
        iterating the engine's dicts here could race the engine thread."""
        waiting = self.engine.num_waiting
        return max(0, self.runner.num_running - waiting), waiting

    def engine_reading(self) -> EngineReading:
        """For /metrics, on the scrape thread: load(), kv_usage() and the stats' ints are safe
        to read there."""
        running, waiting = self.load()
        return EngineReading(running, waiting, self.engine.config.max_slots, self.counters,
                             self.engine.kv_usage(), self.engine.stats,
                             replace(self.engine.grammars.stats))

    def health(self) -> WorkerHealth:
        return WorkerHealth(
            role=self.settings.role,
            model=self.lm.name,
            pid=os.getpid(),
            fingerprint=self.lm.fingerprint,
            dtype=self.engine.layout.name,
            block_size=self.block_size,
            max_model_len=self.engine.max_model_len,
            running=self.load()[0],
            waiting=self.load()[1],
            counters=asdict(self.counters),
            instance_id=self.instance_id,
            page_size=self.engine.config.page_size,
            kv_summary_version=self.engine.pool.resident.version,
        )

    def kv_summary(self) -> KVSummary:
        """The resident-page filter, read off the engine thread (a hint: see
        engine/resident_filter.py). The version is read first, so a change racing the read
        shows up as a newer version next time rather than being missed."""
        resident = self.engine.pool.resident
        version = resident.version
        return KVSummary(version=version, page_size=self.engine.config.page_size,
                         bits=resident.bits, hashes=HASHES,
                         packed=base64.b64encode(resident.packed()).decode())


def build_worker(settings: WorkerSettings, after_step=None) -> Worker:
    config = EngineConfig(
        max_slots=settings.max_slots,
        block_size=settings.block_size,
        prefill_chunk=settings.prefill_chunk,
        max_model_len=settings.max_model_len,
        page_size=settings.page_size,
        kv_cache_bytes=settings.kv_cache_bytes,
        kv_cache_fraction=settings.kv_cache_fraction,
        kv_window=settings.kv_window,
        kv_dtype=settings.kv_dtype,
        cold_prefetch=settings.cold_prefetch,
        compile_decode=settings.compile_decode,
    )
    cold = None if not settings.cold_kv else StoreColdTier.under(
        settings.disk_cache_dir, settings.cold_memory_bytes, settings.cold_disk_bytes)
    spec = resolve_model(settings.model)
    registry = CollectorRegistry()
    runner = EngineRunner(after_step=after_step,
                          on_scheduled=QueueMetrics(registry, spec.name).observe)
    runner.start()


    def make_engine() -> Engine:  # on the engine's thread: the process's one OpenMP pool
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        lm = load_model(spec, dtype=settings.dtype, device=settings.device,
                        quantization=settings.quantization)
        engine = Engine(lm, config, cold)
        # The token trie structured output needs (~0.3 s), built before the worker is ready
        # rather than by its first guided request's check, on the event loop.
        engine.grammars.warm()
        return engine

    try:
        engine = runner.build(make_engine)
    except BaseException:
        runner.stop()
        if cold is not None:
            cold.close()
        raise
    lm = engine.loaded
    observer = StoreMetrics(registry, lm.name)
    # Built even with --no-prefix-cache: the store also carries the prefill->decode handoff
    # (the router then salts keys per request, so nothing is reused across requests).
    store = build_store(settings.store_config(), observer)
    admission = Admission(settings.max_slots + settings.max_queue)
    worker = Worker(settings, lm, engine, runner, store, registry,
                    HandoffMetrics(registry, lm.name), admission, cold=cold)
    registry.register(EngineCollector(lm.name, worker.engine_reading))
    registry.register(StoreCollector(lm.name, store.stats))
    return worker


