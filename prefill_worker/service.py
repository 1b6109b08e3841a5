"""POST /prefill: load the cached prefix, compute the rest of the prompt, sample the first token,
and write the prompt's new full blocks (plus its partial tail) to the store.

The reply is two NDJSON lines: the first token as soon as it is sampled (`PrefillResponse`),
then `PrefillCommitted` once the KV is stored, so the store write is off the TTFT path.

    prompt:  |-- block 0 --|-- block 1 --|-- block 2 --|- tail -|
             |<- loaded from the store ->|<- computed here -->|
                                         written as blocks   written under a request key
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from fastapi import APIRouter, Response

from engine.engine import Engine, SeqRequest, TokenEvent
from kvstore import KeyNamespace, block_keys, tail_key
from wire.internal_api import (
    PrefillCommitted,
    PrefillRequest,
    PrefillResponse,
    WireEvent,
    params_from_wire,
)
from worker.admission import TicketedStream
from worker.app import WorkerDep
from worker.runtime import NO_PREFIX, Worker

routes = APIRouter()


@dataclass(slots=True)
class PromptExport:
    event: TokenEvent
    blocks: dict[str, torch.Tensor]  # key -> [L, 2, H, B, D]
    tail: torch.Tensor | None  # [L, 2, H, t, D], t < B


def export_prompt(
    engine: Engine, ev: TokenEvent, token_ids: list[int], ns: KeyNamespace, first_block: int
) -> PromptExport:
    """On the engine thread, while the slot still holds the prompt's KV."""
    bs = engine.layout.block_size
    n_full = len(token_ids) // bs
    blocks: dict[str, torch.Tensor] = {}
    if n_full > first_block:
        kv = engine.export_blocks(ev.seq_id, first_block, n_full - first_block)
        keys = block_keys(token_ids, ns)[first_block:n_full]
        blocks = dict(zip(keys, kv.unbind(0), strict=True))
    tail = None
    if len(token_ids) > n_full * bs:
        tail = engine.export_kv(ev.seq_id, n_full * bs, len(token_ids))
    return PromptExport(ev, blocks, tail)


async def run_prefill(worker: Worker, body: PrefillRequest) -> tuple[PrefillResponse, Future]:
    """Compute the prompt; returns the reply head and the Future of the KV's store writes."""
    params = params_from_wire(body.params)
    ns = worker.namespace(body.cache_salt)
    n = len(body.token_ids)
    prefix = NO_PREFIX
    if params.prompt_logprobs is None:  # prompt logprobs need every position computed
        prefix = await asyncio.to_thread(worker.load_prefix, body.token_ids, ns, n - 1)
    req = SeqRequest(
        seq_id=body.request_id,
        token_ids=body.token_ids,
        num_prompt_tokens=n,
        params=params,
        **prefix.seq_fields(),
        prefill_only=True,
        cache_salt=body.cache_salt,
    )
    worker.counters.requests_total += 1
    worker.counters.prefix_tokens_loaded_total += prefix.length
    worker.counters.prompt_tokens_computed_total += n - prefix.length
    worker.counters.admit_tokens_computed_total += n - prefix.length

    def on_event(engine: Engine, ev: TokenEvent) -> PromptExport:
        return export_prompt(engine, ev, body.token_ids, ns, prefix.num_blocks)

    # A prefill_only stream yields exactly one item: the first token with its exported KV.
    [out] = [item async for item in worker.runner.stream(req, on_event=on_event)]
    tkey = tail_key(body.request_id, ns) if out.tail is not None else None
    ev = out.event
    head = PrefillResponse(
        event=WireEvent(
            token_id=ev.token_id,
            logprob=ev.logprob,
            top_logprobs=ev.top_logprobs,
            finish_reason=ev.finish_reason,
            prompt_logprobs=ev.prompt_logprobs,
        ),
        num_cached_tokens=prefix.length,
        num_computed_tokens=n - prefix.length,
        tail_key=tkey,
        tail_start=(n // worker.block_size) * worker.block_size,
    )
    worker.counters.blocks_written_total += len(out.blocks) + (tkey is not None)
    return head, worker.writer.submit(_store, worker, out, tkey)


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


async def reply_lines(head: PrefillResponse, stored: Future) -> AsyncIterator[str]:
    # The first token goes out now (the router streams it to the client: that is TTFT); the
    # decode worker reads the KV only after the second line says it is stored. The writes
    # finish even if the router goes away, so the prefix stays cached.
    yield head.model_dump_json(exclude_none=True) + "\n"
    nbytes = await asyncio.shield(asyncio.wrap_future(stored))
    yield PrefillCommitted(stored_bytes=nbytes).model_dump_json() + "\n"


@routes.post("/prefill")
async def prefill(body: PrefillRequest, worker: WorkerDep) -> Response:
    ticket = worker.try_admit()
    if isinstance(ticket, Response):
        return ticket  # 429 full / 503 draining: the router tries another prefill worker
    try:
        head, stored = await run_prefill(worker, body)
    except BaseException:
        ticket.release()
        raise
    return TicketedStream(reply_lines(head, stored), ticket, media_type="application/x-ndjson")
