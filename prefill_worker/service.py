"""POST /prefill: load the cached prefix, compute the rest of the prompt, sample the first token,
and write the prompt's new full blocks (plus its partial tail) to the store.

    prompt:  |-- block 0 --|-- block 1 --|-- block 2 --|- tail -|
             |<- loaded from the store ->|<- computed here -->|
                                         written as blocks   written under a request key
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch
from fastapi import APIRouter, Response

from engine.engine import Engine, SeqRequest, TokenEvent
from kvstore import KeyNamespace, block_keys, tail_key
from tandem.internal_api import PrefillRequest, PrefillResponse, WireEvent, params_from_wire
from tandem.worker_base import PrefixKV, Worker, WorkerDep

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


async def run_prefill(worker: Worker, body: PrefillRequest) -> PrefillResponse:
    params = params_from_wire(body.params)
    ns = worker.namespace(body.cache_salt)
    n = len(body.token_ids)
    prefix = PrefixKV(None, 0, 0)
    if params.prompt_logprobs is None:  # prompt logprobs need every position computed
        prefix = await asyncio.to_thread(worker.load_prefix, body.token_ids, ns, n - 1)
    req = SeqRequest(
        seq_id=body.request_id,
        token_ids=body.token_ids,
        num_prompt_tokens=n,
        params=params,
        prefix_kv=prefix.kv,
        prefix_len=prefix.length,
        prefill_only=True,
    )
    worker.counters.requests_total += 1
    worker.counters.prefix_tokens_loaded_total += prefix.length
    worker.counters.prompt_tokens_computed_total += n - prefix.length
    worker.counters.admit_tokens_computed_total += n - prefix.length

    def on_event(engine: Engine, ev: TokenEvent) -> PromptExport:
        return export_prompt(engine, ev, body.token_ids, ns, prefix.num_blocks)

    # A prefill_only stream yields exactly one item: the first token with its exported KV.
    [out] = [item async for item in worker.runner.stream(req, on_event=on_event)]
    return await _store_and_reply(worker, body, ns, prefix, out)


async def _store_and_reply(
    worker: Worker, body: PrefillRequest, ns: KeyNamespace, prefix: PrefixKV, out: PromptExport
) -> PrefillResponse:
    # The decode worker reads these next, so the reply waits for the writes.
    start = time.perf_counter()
    writes = []
    if out.blocks:
        writes.append(asyncio.wrap_future(worker.write_blocks(out.blocks)))
    tkey = None
    if out.tail is not None:
        tkey = tail_key(body.request_id, ns)
        ttl = worker.settings.tail_ttl_s
        writes.append(asyncio.wrap_future(worker.write_blocks({tkey: out.tail}, ttl_s=ttl)))
    await asyncio.gather(*writes)
    tensors = [*out.blocks.values(), *([out.tail] if out.tail is not None else [])]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    worker.handoff.observe("store", nbytes, time.perf_counter() - start)
    ev = out.event
    bs = worker.block_size
    return PrefillResponse(
        event=WireEvent(
            token_id=ev.token_id,
            logprob=ev.logprob,
            top_logprobs=ev.top_logprobs,
            finish_reason=ev.finish_reason,
            prompt_logprobs=ev.prompt_logprobs,
        ),
        num_cached_tokens=prefix.length,
        num_computed_tokens=len(body.token_ids) - prefix.length,
        tail_key=tkey,
        tail_start=(len(body.token_ids) // bs) * bs,
    )


@routes.post("/prefill", response_model=PrefillResponse, response_model_exclude_none=True)
async def prefill(body: PrefillRequest, worker: WorkerDep) -> PrefillResponse | Response:
    ticket = worker.try_admit()
    if isinstance(ticket, Response):
        return ticket  # 429 full / 503 draining: the router tries another prefill worker
    with ticket:
        return await run_prefill(worker, body)
