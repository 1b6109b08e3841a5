"""POST /prefill: load the cached prefix, compute the rest of the prompt, sample the first token,
and write the prompt's new full blocks (plus its partial tail) to the store.

The reply is two NDJSON lines: the first token as soon as it is sampled (`PrefillResponse`),
then `PrefillCommitted` once the KV is stored, so the store write is off the TTFT path. The
checks come before the 200: a refused request is a 400 (or 429/503 from admission), never a
broken stream. The prompt's computation comes after it, with blank keepalive lines while it
queues and runs, so that a long prompt or a long queue is not taken for a silent worker by the
router's read timeout; a computation that fails cuts the stream, which the router counts as a
worker failure, as it did the 500 before.

    prompt:  |-- block 0 --|-- block 1 --|-- block 2 --|- tail -|
             |<- loaded from the store ->|<- computed here -->|
                                         written as blocks   written under a request key
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from fastapi import APIRouter, Response

from engine.engine import Engine, TokenEvent
from wire.internal_api import PrefillCommitted, PrefillRequest, PrefillResponse
from wire.streaming import ClosingStreamingResponse
from worker.app import WorkerDep
from worker.runtime import Worker
from worker.sequence import Started, check_sequence, count_reuse, fork_specs, start_sequence

routes = APIRouter()
log = logging.getLogger(__name__)


@dataclass(slots=True)
class PromptExport:
    event: TokenEvent
    blocks: dict[str, torch.Tensor]  # key -> [L, 2, H, B, D]
    tail: torch.Tensor | None  # [L, 2, H, t, D], t < B


def export_prompt(engine: Engine, ev: TokenEvent, started: Started) -> PromptExport:
    """On the engine thread, while the slot still holds the prompt's KV: the full blocks past
    the loaded prefix, and the partial tail."""
    n, bs = len(started.req.token_ids), engine.layout.block_size
    first, n_full = started.prefix.num_blocks, n // bs
    blocks: dict[str, torch.Tensor] = {}
    if n_full > first:
        kv = engine.export_blocks(ev.seq_id, first, n_full - first)  # [n, L, 2, H, B, D]
        blocks = dict(zip(started.keys.keys[first:n_full], kv.unbind(0), strict=True))
    tail = engine.export_kv(ev.seq_id, n_full * bs, n) if n > n_full * bs else None
    return PromptExport(ev, blocks, tail)


async def run_prefill(worker: Worker, body: PrefillRequest) -> tuple[PrefillResponse, Future]:
    """Compute the prompt once, sample the first token of it and of each fork; returns the
    reply head and the Future of the KV's store writes."""
    n = len(body.token_ids)
    started = await start_sequence(worker, body, n, prefill_only=True)

    def on_event(engine: Engine, ev: TokenEvent) -> PromptExport | TokenEvent:
        # Only the request's own sequence holds the prompt's KV; a fork just drew a token.
        return export_prompt(engine, ev, started) if ev.seq_id == body.request_id else ev

    # A prefill_only stream yields one item per sequence: the first token (the request's own
    # with the exported KV), in no promised order.
    items = [item async for item in worker.runner.stream(
        started.req, on_event=on_event, forks=fork_specs(body))]
    [out] = [i for i in items if isinstance(i, PromptExport)]
    firsts = {i.seq_id: i for i in items if isinstance(i, TokenEvent)}
    count_reuse(worker, started.req, out.event.num_cached_tokens or 0)
    # The tail's key names its content (kvstore/keys.py): the decode worker recomputes it.
    tkey = started.keys.tail_key(body.request_id, body.token_ids) if out.tail is not None else None
    stored = worker.submit_write(len(out.blocks) + (tkey is not None), _store, worker, out, tkey)
    if stored is None:  # backlog full: nothing stored, nothing promised, the commit comes at once
        tkey, stored = None, Future()
        stored.set_result(0)
    head = PrefillResponse(event=out.event, tail_key=tkey,
                           tail_start=(n // worker.block_size) * worker.block_size,
                           forks=[firsts[f.request_id] for f in body.forks])
    return head, stored


def _store(worker: Worker, out: PromptExport, tkey: str | None) -> int:
    """On a writer thread: the prompt's new blocks, then its tail. Returns the bytes stored."""
    start = time.perf_counter()
    tensors = list(out.blocks.values())
    if out.blocks:
        worker.store.put_many(out.blocks)
    if tkey is not None:
        worker.store.put_many({tkey: out.tail}, ttl_s=worker.settings.tail_ttl_s)
        tensors.append(out.tail)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    worker.handoff.observe("store", nbytes, time.perf_counter() - start)
    return nbytes


async def reply_lines(worker: Worker, body: PrefillRequest) -> AsyncIterator[str]:
    # The first token goes out once sampled (the router streams it to the client: that is
    # TTFT); the decode worker reads the KV only after the second line says it is stored. The
    # writes finish even if the router goes away, so the prefix stays cached. A router that
    # goes away before the head closes this stream, which aborts the computation.
    head, stored = await run_prefill(worker, body)
    yield head.model_dump_json(exclude_none=True) + "\n"
    nbytes = await asyncio.shield(asyncio.wrap_future(stored))
    yield PrefillCommitted(stored_bytes=nbytes).model_dump_json() + "\n"


@routes.post("/prefill")
async def prefill(body: PrefillRequest, worker: WorkerDep) -> Response:
    check_sequence(worker, body, len(body.token_ids))  # 400 before admission and streaming
    ticket = worker.try_admit()
    if isinstance(ticket, Response):
        return ticket  # 429 full / 503 draining: the router tries another prefill worker
    lines = worker.keepalive(reply_lines(worker, body))
    return ClosingStreamingResponse(lines, on_close=ticket.release,
                                    media_type="application/x-ndjson")
