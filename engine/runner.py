"""Runs an Engine on one dedicated thread and lets asyncio code stream from it.

The Engine is single-threaded by contract. Everything that touches it (add, abort, step,
export) happens on the runner's thread; other threads talk to it through a command queue, and
get results back through per-sequence asyncio queues or concurrent futures.

The runner's thread should be the process's only one that runs parallel torch ops, loading the
model included (`build`): libgomp gives every thread that starts a parallel region its own pool
of helper threads, and once a process holds more of them than it has CPUs, every pool stops
spinning between regions and sleeps instead. A decode step is ~450 small regions, each then
paying a futex wake: measured on 2 vCPUs in bf16, batch-1 decode on a second thread fell from
~34 to ~21 tok/s while the loading thread's pool lived, and back to ~34 with the model loaded
on the engine's own thread (docs/BENCHMARKS.md, "Serving speed after three changes").

Failures stay with the sequence that caused them: a request engine.add() refuses, or one the
engine drops mid-step for a failure of its own (Engine.take_failed), ends only its own stream.
Only a step that raises (a broken forward) fails every sequence in flight.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from engine.engine import Engine, SeqRequest, TokenEvent
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

StepHook = Callable[[Engine, list[TokenEvent]], None]
EventHook = Callable[[Engine, TokenEvent], Any]
QueueHook = Callable[[float], None]  # seconds from stream() to the first step feeding it


_CLOSED = object()  # queued when a stream's last open sequence was aborted: it is over


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # of (item, is_last) tuples, or an exception
    on_event: EventHook | None
    prefill_only: bool
    submitted: float  # perf_counter() at stream()
    start_kv: int = -1  # the engine's kv_len at admission; -1 once a step has fed it
    head: str = ""  # the request's seq_id (forks share the stream)
    members: int = 1  # sequences still open: the request's, plus any forked off it


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _flush(batches: dict[asyncio.AbstractEventLoop, list]) -> None:
    """Queue each loop's batch of (queue, item) with one wake-up, and empty `batches`."""
    for loop, items in batches.items():
        loop.call_soon_threadsafe(_put_all, items)
    batches.clear()


class EngineRunner:
    """Owns an Engine and its thread. `after_step` hooks run on the engine thread."""

    def __init__(self, engine: Engine | None = None, after_step: StepHook | None = None,
                 on_scheduled: QueueHook | None = None):
        self.engine = engine  # None until build()
        self._after_step = after_step
        self._on_scheduled = on_scheduled
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        # monotonic() each time the engine thread comes round its loop: after every step, and
        # at least every 0.5 s while idle. A hung step stops it (see turned_within).
        self._turned = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)  # wake the loop
        self._thread.join(timeout=10)

    def build(self, make: Callable[[], Engine]) -> Engine:
        """Run make() on the runner's thread (started) and serve the Engine it returns."""
        assert self.engine is None and self._thread.is_alive()

        def install(_: None) -> Engine:
            self.engine = make()
            return self.engine

        return self.call(install).result()

    @property
    def num_running(self) -> int:
        return len(self._streams)

    def turned_within(self, seconds: float) -> bool:
        """Whether the engine thread finished a step (or an idle wait) in the last `seconds`:
        the condition for a reply stream's keepalive, so that a hung engine still goes silent
        and the router fails its requests over."""
        return time.monotonic() - self._turned < seconds

    async def stream(self, req: SeqRequest, on_event: EventHook | None = None,
                     forks: Sequence[tuple[str, SamplingParams]] = ()) -> AsyncIterator:
        """Submit a sequence and yield its events; closing the generator early aborts it.

        `on_event(engine, event)` runs on the engine thread before delivery and its result is
        yielded instead of the event: the place to export KV while the slot still holds it.
        A `prefill_only` sequence ends after its first event, and its slot is released.
        `forks` (seq_id, params) are siblings forked off it before its first sample (n > 1:
        one prompt computation); their events come through the same stream (event.seq_id
        tells them apart), which ends when every one of them has.
        """
        loop = asyncio.get_running_loop()
        s = _Stream(loop, asyncio.Queue(), on_event, req.prefill_only, time.perf_counter(),
                    head=req.seq_id, members=1 + len(forks))
        self._commands.put(lambda: self._add(req, s, forks))
        ids = [req.seq_id, *(f[0] for f in forks)]
        finished = False
        try:
            while not finished:
                item = await s.queue.get()
                if item is _CLOSED:
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                value, finished = item
                yield value
        finally:
            if not finished:
                for seq_id in ids:
                    self.abort(seq_id)

    def abort(self, seq_id: str) -> None:
        self._commands.put(lambda: self._abort(seq_id))

    def call(self, fn: Callable[[Engine], Any]) -> Future:
        """Run fn(engine) on the engine thread between steps."""
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self._commands.put(run)
        return fut

    # --- engine thread only -------------------------------------------------------------------

    def _add(self, req: SeqRequest, s: _Stream, forks: Sequence[tuple[str, SamplingParams]]
             ) -> None:
        ids = [req.seq_id, *(f[0] for f in forks)]
        for seq_id in ids:
            old = self._streams.get(seq_id)
            if old is not None:
                # A retried handoff with the same request id supersedes the first attempt, so
                # the request is never generated twice.
                self._put(old, RuntimeError(f"{seq_id} superseded by a retry"))
                self._abort(seq_id)
        try:
            self.engine.add(req)
            for child_id, params in forks:
                self.engine.fork(req.seq_id, child_id, params)
        except Exception as e:  # invalid request: report to its caller, keep serving others
            log.exception("engine rejected %s", req.seq_id)
            for seq_id in ids:
                self.engine.abort(seq_id)
            self._put(s, e)
            return
        for seq_id in ids:
            self._streams[seq_id] = s
        if self._on_scheduled is not None:
            s.start_kv = self.engine.kv_len(req.seq_id)

    def _abort(self, seq_id: str) -> None:
        """Forget one sequence; a stream whose last open member it was is over."""
        s = self._streams.pop(seq_id, None)
        if s is not None:
            self.engine.abort(seq_id)
            s.members -= 1
            if s.members == 0:
                self._put(s, _CLOSED)

    def _put(self, s: _Stream, item: Any) -> None:
        s.loop.call_soon_threadsafe(s.queue.put_nowait, item)

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        cmd()
        while True:
            try:
                self._commands.get_nowait()()
            except queue.Empty:
                return

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._turned = time.monotonic()
            self._drain_commands(block=not self._has_work())
            if not self._has_work():
                continue
            step_start = time.perf_counter()
            try:
                events = self.engine.step()
            except Exception as e:
                self._fail_all(e)
                continue
            self._report_scheduled(step_start)
            self._deliver(events)
            self._fail_some(self.engine.take_failed())
            if self._after_step is not None:
                self._after_step(self.engine, events)

    def _has_work(self) -> bool:
        return self.engine is not None and self.engine.has_work()

    def _report_scheduled(self, step_start: float) -> None:
        """Queue time of each sequence this step fed for the first time (a step feeds a
        sequence iff its kv_len moves). Runs before _deliver, which forgets finished ones."""
        if self._on_scheduled is None:
            return
        for seq_id, s in self._streams.items():
            if s.start_kv >= 0 and seq_id == s.head and self.engine.kv_len(seq_id) != s.start_kv:
                s.start_kv = -1
                self._on_scheduled(max(0.0, step_start - s.submitted))

    def _deliver(self, events: list[TokenEvent]) -> None:
        """Hand a step's events to their streams: one wake-up per event loop per step, not per
        event (each call_soon_threadsafe writes the loop's self-pipe and hands it the GIL)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for ev in events:
            s = self._streams.get(ev.seq_id)
            if s is None:
                continue
            last = ev.finish_reason is not None or s.prefill_only
            try:
                value = s.on_event(self.engine, ev) if s.on_event else ev
            except Exception as e:
                log.exception("event hook failed for %s", ev.seq_id)
                _flush(batches)  # what came before goes first, then the error, then the close
                self._put(s, e)
                self._end_stream(s)
                continue
            if last:
                del self._streams[ev.seq_id]
                s.members -= 1
                if s.prefill_only or ev.finish_reason is None:
                    self.engine.release(ev.seq_id)
            batches.setdefault(s.loop, []).append((s.queue, (value, s.members == 0)))
        _flush(batches)

    def _end_stream(self, s: _Stream) -> None:
        """Forget every sequence still open on stream `s` (one failed: the stream is over;
        the caller queued the error first, so the consumer raises it)."""
        for seq_id in [k for k, v in self._streams.items() if v is s]:
            self._abort(seq_id)

    def _fail_some(self, failed: list[tuple[str, Exception]]) -> None:
        """Sequences the engine dropped for a failure of their own: end just their streams."""
        for seq_id, err in failed:
            s = self._streams.get(seq_id)
            if s is not None:
                self._put(s, RuntimeError(f"sequence {seq_id} failed in the engine: {err!r}"))
                self._end_stream(s)

    def _fail_all(self, err: Exception) -> None:
        """A failed step poisons every sequence in flight: fail them, never emit bad tokens."""
        log.exception("engine step failed; failing %d sequences", len(self._streams))
        for seq_id, s in list(self._streams.items()):
            self._put(s, RuntimeError(f"engine step failed: {err}"))
            self.engine.abort(seq_id)
        self._streams.clear()
