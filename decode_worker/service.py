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

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Response

from engine.engine import Engine, TokenEvent
from kvstore import KeyChain
from wire.internal_api import DecodeRequest, event_line
from wire.streaming import ClosingStreamingResponse
from worker.app import WorkerDep
from worker.runtime import Worker
from worker.sequence import Started, check_sequence, count_reuse, start_sequence

routes = APIRouter()


@dataclass(slots=True)
class BlockWriter:
    """Per sequence, on the engine thread: store each block as soon as its KV is complete."""

    worker: Worker
    keys: KeyChain  # extended as tokens arrive: one hash per new block
    tokens: list[int]
    written: int  # leading blocks already in the store

    def on_event(self, engine: Engine, ev: TokenEvent) -> TokenEvent:
        if ev.finish_reason is None:
            self._flush(engine, ev.seq_id)
        self.tokens.append(ev.token_id)
        return ev

    def _flush(self, engine: Engine, seq_id: str) -> None:
        full = engine.kv_len(seq_id) // engine.layout.block_size
        if full <= self.written:
            return
        kv = engine.export_blocks(seq_id, self.written, full - self.written)  # [n, L, 2, H, B, D]
        self.keys.extend(self.tokens)  # a key covers tokens only, so keying ahead of KV is fine
        keys = self.keys.keys[self.written : full]
        self.worker.write_blocks(dict(zip(keys, kv.unbind(0), strict=True)))
        self.written = full


async def event_lines(worker: Worker, started: Started) -> AsyncIterator[str]:
    req = started.req
    writer = BlockWriter(worker, started.keys, list(req.token_ids), started.prefix.num_blocks)
    async for ev in worker.runner.stream(req, on_event=writer.on_event):
        if ev.num_cached_tokens is not None:
            count_reuse(worker, started.req, ev.num_cached_tokens)
        yield event_line(ev)


@routes.post("/generate")
async def generate(body: DecodeRequest, worker: WorkerDep) -> Response:
    check_sequence(worker, body, body.num_prompt_tokens)  # 400 before admission
    # A resume carries generated tokens beyond the prefill worker's first one: the client has
    # seen them already, so it is admitted past the queue limit (worker/admission.py).
    resume = len(body.token_ids) > body.num_prompt_tokens + 1
    ticket = worker.try_admit(resume)
    if isinstance(ticket, Response):
        return ticket
    try:
        started = await start_sequence(worker, body, body.num_prompt_tokens,
                                       tail_key=body.tail_key, tail_start=body.tail_start)
    except BaseException:
        ticket.release()
        raise
    # A client disconnect closes the body, which aborts the sequence and frees its slot.
    return ClosingStreamingResponse(event_lines(worker, started), on_close=ticket.release,
                                    media_type="application/x-ndjson")
