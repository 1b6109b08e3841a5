"""POST /generate: admit a sequence into the continuous batch and stream its tokens as NDJSON.

The request carries every known token (prompt, the prefill worker's first token, and on
failover whatever was generated before). The worker loads the longest stored prefix, computes
the rest itself, and writes each newly completed block back to the store, so a later chat turn
or another worker resuming this request finds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Response

from engine.engine import Engine, SeqRequest, TokenEvent
from kvstore import KeyNamespace, block_keys
from wire.internal_api import DecodeRequest, WireEvent, params_from_wire
from worker.admission import TicketedStream
from worker.app import WorkerDep
from worker.runtime import Worker

routes = APIRouter()


@dataclass(slots=True)
class BlockWriter:
    """Per sequence, on the engine thread: store each block as soon as its KV is complete."""

    worker: Worker
    ns: KeyNamespace
    tokens: list[int]
    written: int  # leading blocks already in the store

    def on_event(self, engine: Engine, ev: TokenEvent) -> TokenEvent:
        if ev.finish_reason is None:
            self._flush(engine, ev.seq_id)
        self.tokens.append(ev.token_id)
        return ev

    def _flush(self, engine: Engine, seq_id: str) -> None:
        bs = engine.layout.block_size
        full = engine.kv_len(seq_id) // bs
        if full <= self.written:
            return
        kv = engine.export_blocks(seq_id, self.written, full - self.written)  # [n, L, 2, H, B, D]
        keys = block_keys(self.tokens[: full * bs], self.ns)[self.written : full]
        self.worker.write_blocks(dict(zip(keys, kv.unbind(0), strict=True)))
        self.written = full


async def start_sequence(worker: Worker, body: DecodeRequest) -> tuple[SeqRequest, BlockWriter]:
    params = params_from_wire(body.params)
    ns = worker.namespace(body.cache_salt)
    n = len(body.token_ids)
    prefix = await asyncio.to_thread(
        worker.load_prefix, body.token_ids, ns, n - 1, body.tail_key, body.tail_start
    )
    req = SeqRequest(
        seq_id=body.request_id,
        token_ids=body.token_ids,
        num_prompt_tokens=body.num_prompt_tokens,
        params=params,
        cache_salt=body.cache_salt,
        **prefix.seq_fields(),
    )
    worker.counters.requests_total += 1
    worker.counters.blocks_loaded_total += prefix.num_blocks
    return req, BlockWriter(worker, ns, list(body.token_ids), prefix.num_blocks)


def count_reuse(worker: Worker, body: DecodeRequest, cached: int) -> None:
    """On the first event: `cached` leading tokens came from the store or the engine's
    resident KV (possibly more than the store had), the rest were computed here."""
    worker.counters.prefix_tokens_loaded_total += cached
    worker.counters.prompt_tokens_computed_total += max(0, body.num_prompt_tokens - cached)
    worker.counters.admit_tokens_computed_total += len(body.token_ids) - cached


async def event_lines(worker: Worker, body: DecodeRequest) -> AsyncIterator[str]:
    req, writer = await start_sequence(worker, body)
    async for ev in worker.runner.stream(req, on_event=writer.on_event):
        if ev.num_cached_tokens is not None:
            count_reuse(worker, body, ev.num_cached_tokens)
        wire = WireEvent(
            token_id=ev.token_id,
            logprob=ev.logprob,
            top_logprobs=ev.top_logprobs,
            finish_reason=ev.finish_reason,
            num_cached_tokens=ev.num_cached_tokens,
            prompt_logprobs=ev.prompt_logprobs,
        )
        yield wire.model_dump_json(exclude_none=True) + "\n"


@routes.post("/generate")
async def generate(body: DecodeRequest, worker: WorkerDep) -> Response:
    # A resume carries generated tokens beyond the prefill worker's first one: the client has
    # seen them already, so it is admitted past the queue limit (worker/admission.py).
    resume = len(body.token_ids) > body.num_prompt_tokens + 1
    ticket = worker.try_admit(resume)
    if isinstance(ticket, Response):
        return ticket
    # A client disconnect closes the body, which aborts the sequence and frees its slot.
    return TicketedStream(event_lines(worker, body), ticket, media_type="application/x-ndjson")
