"""POST /generate: admit a sequence into the continuous batch and stream its tokens as NDJSON.

The request carries every known token (prompt, the prefill worker's first token, and on
failover whatever was generated before). The worker loads the longest stored prefix, computes
the rest itself, and writes each newly completed block back to the store, so a later chat turn
or another worker resuming this request finds it.

    check (400) -> admit (429/503) -> key + load the prefix (an error: 5xx) -> 200, stream

Everything that can refuse or fail a request comes before the 200; once streaming, only the
engine can end the stream early.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from fastapi import APIRouter, Response

from engine.engine import Engine, TokenEvent
from kvstore import KeyChain
from wire.internal_api import AbortRequest, DecodeRequest, event_line
from wire.streaming import ClosingStreamingResponse
from worker.app import WorkerDep
from worker.runtime import Worker
from worker.sequence import Started, check_sequence, count_reuse, fork_specs, start_sequence

log = logging.getLogger(__name__)
routes = APIRouter()


@dataclass(slots=True)
class BlockWriter:
    """Per sequence, on the engine thread: store each block as soon as its KV is complete."""

    worker: Worker
    keys: KeyChain  # extended as tokens arrive: one hash per new block
    tokens: list[int]
    written: int  # leading blocks already in the store

    def on_event(self, engine: Engine, ev: TokenEvent) -> TokenEvent:
        seq_id = ev.seq_id
        if ev.finish_reason is None and self._complete(engine, seq_id) > self.written:
            # Copied out after this step's tokens are delivered, before the next step: a
            # prompt's blocks are tens of MB (~130 MB for 2,900 tokens in fp32), and copying
            # them here held back the first token of this request and of every other one in
            # the step (docs/BENCHMARKS.md, "Serving speed, session 14").
            self.worker.runner.call(lambda e: self._flush(e, seq_id)).add_done_callback(
                _log_failure)
        self.tokens.append(ev.token_id)
        return ev

    def _complete(self, engine: Engine, seq_id: str) -> int:
        return engine.kv_len(seq_id) // engine.layout.block_size

    def _flush(self, engine: Engine, seq_id: str) -> None:
        if not engine.has(seq_id):
            return  # aborted since its event: nothing more of it is stored
        full = self._complete(engine, seq_id)
        if full <= self.written:
            return
        kv = engine.export_blocks(seq_id, self.written, full - self.written)  # [n, L, 2, H, B, D]
        self.keys.extend(self.tokens)  # a key covers tokens only, so keying ahead of KV is fine
        keys = self.keys.keys[self.written : full]
        self.worker.write_blocks(dict(zip(keys, kv.unbind(0), strict=True)))
        self.written = full


def _log_failure(done: Future) -> None:
    """A block that fails to export is only a miss later; the request itself goes on."""
    if done.exception() is not None:
        log.warning("storing a sequence's blocks failed: %r", done.exception())


def block_writers(worker: Worker, started: Started, body: DecodeRequest) -> dict[str, BlockWriter]:
    """One writer per sequence. A fork's start with the prompt's full blocks, which its parent
    writes; each then stores the blocks of its own tokens."""
    req = started.req
    writers = {req.seq_id: BlockWriter(worker, started.keys, list(req.token_ids),
                                       started.prefix.num_blocks)}
    prompt_blocks = len(req.token_ids) // worker.block_size
    for f in body.forks:
        writers[f.request_id] = BlockWriter(worker, started.keys.copy(), list(req.token_ids),
                                            prompt_blocks)
    return writers


async def event_lines(worker: Worker, started: Started, body: DecodeRequest,
                      on_end: Callable[[], None]) -> AsyncIterator[str]:
    """The NDJSON lines of every sequence of the call; `on_end()` as each one finishes."""
    writers = block_writers(worker, started, body)

    def on_event(engine: Engine, ev: TokenEvent) -> TokenEvent:
        return writers[ev.seq_id].on_event(engine, ev)

    async for ev in worker.runner.stream(started.req, on_event=on_event,
                                         forks=fork_specs(body)):
        if ev.num_cached_tokens is not None and ev.seq_id == body.request_id:
            count_reuse(worker, started.req, ev.num_cached_tokens)
        if ev.finish_reason is not None:
            on_end()
        yield event_line(ev)


@routes.post("/generate")
async def generate(body: DecodeRequest, worker: WorkerDep) -> Response:
    check_sequence(worker, body, body.num_prompt_tokens)  # 400 before admission
    # A resume carries generated tokens beyond the prefill worker's first one: the client has
    # seen them already, so it is admitted past the queue limit (worker/admission.py).
    resume = len(body.token_ids) > body.num_prompt_tokens + 1
    ticket = worker.try_admit(resume, units=1 + len(body.forks))
    if isinstance(ticket, Response):
        return ticket
    try:
        started = await start_sequence(worker, body, body.num_prompt_tokens,
                                       tail_key=body.tail_key, tail_start=body.tail_start,
                                       tail_owner=body.tail_owner)
    except BaseException:
        ticket.release()
        raise
    # A client disconnect closes the body, which aborts the sequences and frees their slots.
    lines = event_lines(worker, started, body, on_end=lambda: ticket.release(1))
    lines = worker.keepalive(lines)
    return ClosingStreamingResponse(lines, on_close=ticket.release,
                                    media_type="application/x-ndjson")


@routes.post("/abort")
async def abort(body: AbortRequest, worker: WorkerDep) -> Response:
    """Stop one sequence (a fork the router no longer wants). Its stream's other sequences
    go on; an unknown or finished id is a no-op, so the answer is always 204."""
    worker.runner.abort(body.request_id)
    return Response(status_code=204)
