"""n > 1: the choices of one prompt share its computation (Engine.fork on the worker).

    prefill hop:  /prefill with forks ──▶ n first tokens ──▶ n decode calls, one per choice,
                  (the prompt computed once)                   each loading the prompt's KV
    no prefill:   /generate with forks ──▶ one stream of n choices' events (by seq_id)
                  (prompt computed once on the decode worker, the choices decode side by side)

Each choice is then what it would be alone: position-seeded sampling (engine/sampler.py) makes
a forked choice draw the very tokens its own call would. Faults follow the single-choice
rules (router/dispatch/disaggregated.py): a shared call is retried whole until its first event;
once choices are streaming and it breaks, each unfinished choice resumes alone with its tokens
so far. A choice the router stops reading (a stop string) is aborted on the worker while the
others go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING

from engine.sequence import TokenEvent
from router.dispatch.backend import BackendUnavailable, GenerateRequest
from router.dispatch.bodies import as_fork, decode_body
from router.dispatch.faults import (
    RetryState,
    WorkerFailed,
    WorkerRefused,
    WorkerRejected,
    backoff_s,
)
from router.dispatch.worker_info import WorkerInfo
from wire.internal_api import PrefillResponse

if TYPE_CHECKING:
    from router.dispatch.disaggregated import DisaggregatedBackend

log = logging.getLogger(__name__)


class ChoiceGroup:
    """One prompt's choices (same tokens and salt; own ids and params). A driver task makes
    the shared calls and feeds one queue per choice; `members()` are the choices' iterators.
    The driver starts with the first member read and is cancelled once none is left."""

    def __init__(self, backend: DisaggregatedBackend, reqs: Sequence[GenerateRequest]):
        self.b = backend
        self.reqs = list(reqs)
        self.queues: list[asyncio.Queue] = [asyncio.Queue() for _ in reqs]
        self.open = set(range(len(reqs)))  # members still read
        self.finished: set[int] = set()
        self.shared: WorkerInfo | None = None  # the worker streaming every choice, if any
        self.tasks: dict[int | None, asyncio.Task] = {}  # None: the driver; j: choice j alone
        self.aborts: set[asyncio.Task] = set()  # held until done (the loop keeps weak refs)

    def members(self) -> list[AsyncIterator[TokenEvent]]:
        return [self._member(j) for j in range(len(self.reqs))]

    async def _member(self, j: int) -> AsyncIterator[TokenEvent]:
        if None not in self.tasks:
            self.tasks[None] = asyncio.create_task(self._drive())
        try:
            while True:
                item = await self.queues[j].get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._leave(j)

    def _leave(self, j: int) -> None:
        self.open.discard(j)
        task = self.tasks.pop(j, None)
        if task is not None:
            task.cancel()
        elif self.shared is not None and j not in self.finished and self.open:
            abort = asyncio.create_task(self.b.abort(self.shared, self.reqs[j].request_id))
            self.aborts.add(abort)
            abort.add_done_callback(self.aborts.discard)
        if not self.open:
            for task in self.tasks.values():
                task.cancel()

    def _put(self, j: int, item: TokenEvent | BaseException) -> None:
        if isinstance(item, TokenEvent) and item.finish_reason is not None:
            self.finished.add(j)
        self.queues[j].put_nowait(item)

    async def _drive(self) -> None:
        try:
            state = self.b.retry_state(self.reqs[0])
            handoff = await self.b.prefill_if_worth_it(self.reqs[0], state, self.reqs[1:])
            if handoff is not None:
                await self._after_prefill(*handoff, state)
            else:
                await self._decode_together(state)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - every choice that is still open hears it
            for j in self.open - self.finished:
                self._put(j, e)

    async def _after_prefill(self, head: PrefillResponse, rest: AsyncIterator,
                             state: RetryState) -> None:
        """Each choice's first token now (TTFT), then a decode call each once the prompt's
        KV is stored: they load it, none recomputes it."""
        firsts = [head.event, *head.forks]
        async with aclosing(rest):
            for j, ev in enumerate(firsts):
                self._put(j, ev)
            committed = await self.b.await_commit(rest)
        owner = self.reqs[0].request_id  # whose id the prompt's tail is stored under
        for j, ev in enumerate(firsts):
            if ev.finish_reason is None and j in self.open:
                body = decode_body(self.reqs[j], [ev.token_id], head if committed else None,
                                   owner)
                state = self.b.retry_state(self.reqs[j], streaming=True)
                self._alone(j, self.b.decode(body, state, report_cached=False))

    def _alone(self, j: int, events: AsyncIterator[TokenEvent]) -> None:
        """Choice j goes on in a call of its own."""
        self.tasks[j] = asyncio.create_task(self._pump(j, events))

    async def _pump(self, j: int, events: AsyncIterator[TokenEvent]) -> None:
        try:
            async with aclosing(events):
                async for ev in events:
                    self._put(j, ev)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - the choice's reader raises it
            self._put(j, e)

    async def _decode_together(self, state: RetryState) -> None:
        """One decode call forks every choice off the prompt. Retried whole (another worker)
        until its first event; a break after that resumes each unfinished choice alone."""
        body = decode_body(self.reqs[0])
        body.forks = [as_fork(r) for r in self.reqs[1:]]
        index = {r.request_id: j for j, r in enumerate(self.reqs)}
        tokens = [list(r.token_ids) for r in self.reqs]
        while True:
            w = await self.b.pick_decode(state)
            try:
                await self._stream_shared(w, body, index, tokens, state)
                return
            except WorkerRefused as e:
                self.b.refused(w, e, state)
            except WorkerRejected as e:
                raise self.b.rejected(w, e) from e
            except WorkerFailed as e:
                log.warning("decode of %d choices on %s failed (%s)", len(self.reqs), w.url, e)
                retry = self.b.failed(w, state)
                if state.streaming:
                    self._resume_each(tokens, w)
                    return
                if not retry:
                    raise BackendUnavailable(
                        f"decode failed {state.failures} times; giving up") from e
                await asyncio.sleep(backoff_s(state.failures))
            finally:
                self.shared = None

    async def _stream_shared(self, w: WorkerInfo, body, index: dict[str, int],
                             tokens: list[list[int]], state: RetryState) -> None:
        async with aclosing(self.b.call_decode(w, body)) as events:
            self.shared = w
            async for ev in events:
                j = index.get(ev.seq_id)
                if j is None:
                    raise WorkerFailed(f"an event for an unknown sequence {ev.seq_id!r}")
                state.streaming = True
                tokens[j].append(ev.token_id)
                self._put(j, ev)
                if self.finished >= self.open:
                    return  # every choice still read has finished
        raise WorkerFailed("stream ended before every choice finished")

    def _resume_each(self, tokens: list[list[int]], failed: WorkerInfo) -> None:
        """After a shared stream broke: each unfinished choice resumes alone from its own
        tokens (the prompt's blocks are in the store), never on the worker that failed."""
        for j in sorted(self.open - self.finished):
            req = self.reqs[j]
            body = decode_body(req, tokens[j][len(req.token_ids):])
            state = self.b.retry_state(req, streaming=True)
            state.failed.add(failed.url)
            self._alone(j, self.b.decode(body, state, report_cached=False))
