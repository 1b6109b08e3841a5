"""Starting a sequence, the same for prefill and decode: check -> namespace -> block keys ->
prefix load from the store -> engine request -> counters.

    known tokens:  |-- block 0 --|-- block 1 --|-- block 2 --|-- block 3 --|- tail -|
                   |<- in the engine's pool ->|<- loaded from the store ->|<- computed ->|

The engine's own page pool is asked first (Engine.cached_prefix_tokens): blocks it holds are
not read from the store, only the ones after them.

`check_sequence` runs the engine's own checks before the worker answers, so a bad request is a
400, never a broken stream. The block keys are a `KeyChain` made once here; a decode worker
extends it as it generates, so keying each new block costs that block only. The prompt's tail
key is recomputed here from the worker's own tokens (kvstore/keys.py): a key the caller sends is
only a claim that the tail was stored, and it is read only when it is that key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch

from engine.intake import InvalidRequest
from engine.sampling_params import SamplingParams
from engine.sequence import SeqRequest
from kvstore import KeyChain, KeyNamespace
from wire.internal_api import SequenceRequest
from worker.runtime import Worker

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefixKV:
    blocks: list[torch.Tensor] | None  # each [L, 2, H, B, D]: tokens [start, start + n * B)
    tail: torch.Tensor | None  # [L, 2, H, t, D], t < B: the request's partial last block
    length: int  # tokens covered from 0 (pool + blocks + tail), capped at the caller's limit
    num_blocks: int  # leading full blocks the store holds (loaded or not): not to write again
    start: int = 0  # tokens [0, start) are in the engine's pool, so not loaded

    def seq_fields(self) -> dict:
        """The SeqRequest fields that import this prefix (none when nothing was loaded)."""
        if self.length <= self.start:
            return {}
        fields = {"prefix_len": self.length, "prefix_start": self.start}
        if self.blocks is None:  # a tail alone (a prompt under one block) is a flat prefix
            return {"prefix_kv": self.tail, **fields}
        return {"prefix_kv": self.blocks, "prefix_tail": self.tail, **fields}

    @property
    def num_loaded(self) -> int:
        return len(self.blocks) if self.blocks else 0


NO_PREFIX = PrefixKV(None, None, 0, 0)


@dataclass(slots=True)
class Started:
    req: SeqRequest
    ns: KeyNamespace
    keys: KeyChain  # keys of the known tokens' full blocks
    prefix: PrefixKV


def check_sequence(worker: Worker, body: SequenceRequest, num_prompt_tokens: int) -> None:
    """Raise InvalidRequest (a 400, worker/errors.py) unless the engine would run `body` and
    each of its forks: the very checks engine.add makes, on the event loop before anything
    streams."""
    try:
        worker.engine.check(SeqRequest(body.request_id, body.token_ids, num_prompt_tokens,
                                       body.params))
        for fork in body.forks:  # the same tokens: only their parameters are their own
            worker.engine.check_params(fork.params)
        _check_forks(worker, body, num_prompt_tokens)
    except InvalidRequest:
        worker.counters.requests_invalid_total += 1
        raise


def fork_specs(body: SequenceRequest) -> list[tuple[str, SamplingParams]]:
    """(seq_id, params) of the request's forks, as EngineRunner.stream takes them."""
    return [(f.request_id, f.params) for f in body.forks]


def _check_forks(worker: Worker, body: SequenceRequest, num_prompt_tokens: int) -> None:
    if not body.forks:
        return
    ids = {body.request_id, *(f.request_id for f in body.forks)}
    if len(ids) != 1 + len(body.forks):
        raise InvalidRequest("forks", "fork request ids must differ from each other and "
                             "from request_id")
    if len(body.token_ids) != num_prompt_tokens:
        raise InvalidRequest("forks", "forks start from the prompt: nothing may be generated")
    if len(ids) > worker.admission.capacity:
        raise InvalidRequest("forks", f"{len(ids)} sequences in one call; this worker holds "
                             f"at most {worker.admission.capacity}")


async def start_sequence(
    worker: Worker, body: SequenceRequest, num_prompt_tokens: int, *, prefill_only: bool = False,
    tail_key: str | None = None, tail_start: int = 0, tail_owner: str | None = None,
) -> Started:
    """Key the known tokens and load their stored prefix (on a thread: hashing and store reads
    block), and build the engine request. `tail_key`/`tail_start` say the prefill worker stored
    the prompt's tail (for request `tail_owner`, default this one); it is loaded only if they
    match what this worker computes itself."""
    ns = worker.namespace(body.cache_salt)
    keys = KeyChain(ns)
    # Prompt logprobs need every position computed, so nothing is loaded for them.
    limit = len(body.token_ids) - 1 if body.params.prompt_logprobs is None else 0
    claim = (tail_key, tail_start, tail_owner or body.request_id) if tail_key else None
    prefix = await asyncio.to_thread(
        _key_and_load, worker, body, num_prompt_tokens, keys, limit, claim
    )
    req = SeqRequest(
        seq_id=body.request_id,
        token_ids=body.token_ids,
        num_prompt_tokens=num_prompt_tokens,
        params=body.params,
        prefill_only=prefill_only,
        cache_salt=body.cache_salt,
        **prefix.seq_fields(),
    )
    worker.counters.requests_total += 1
    worker.counters.blocks_loaded_total += prefix.num_loaded
    return Started(req, ns, keys, prefix)


def count_reuse(worker: Worker, req: SeqRequest, cached: int) -> None:
    """On the first event: `cached` leading tokens came from the store or the engine's
    resident KV (possibly more than the store had), the rest were computed here."""
    worker.counters.prefix_tokens_loaded_total += cached
    worker.counters.prompt_tokens_computed_total += max(0, req.num_prompt_tokens - cached)
    worker.counters.admit_tokens_computed_total += len(req.token_ids) - cached


def _key_and_load(
    worker: Worker, body: SequenceRequest, num_prompt_tokens: int, keys: KeyChain, limit: int,
    claim: tuple[str, int, str] | None,
) -> PrefixKV:
    keys.extend(body.token_ids)
    tail_key, tail_start = None, 0
    if claim is not None:
        # The prompt's partial last block, keyed from our own tokens: a forged or stale key
        # (another namespace or prompt) is never read, so never deleted either. The owner
        # only scopes the key; its content is these tokens' KV whoever stored it.
        claimed_key, claimed_start, owner = claim
        tail_start = num_prompt_tokens // worker.block_size * worker.block_size
        mine = keys.tail_key(owner, body.token_ids, num_prompt_tokens)
        if (claimed_key, claimed_start) != (mine, tail_start):
            log.warning("%s: ignoring a tail key that is not this prompt's", body.request_id)
        else:
            tail_key = mine
    resident = worker.engine.cached_prefix_tokens(body.token_ids, body.cache_salt) if limit else 0
    return load_prefix(worker, keys.keys, limit, tail_key, tail_start, resident)


def load_prefix(
    worker: Worker, keys: list[str], limit: int, tail_key: str | None = None, tail_start: int = 0,
    resident: int = 0,
) -> PrefixKV:
    """Leading KV from the store for the first `limit` tokens, whose full blocks are `keys`
    (blocking: call from a thread), skipping the blocks within the first `resident` tokens
    (the engine's pool has them). Stops at the first missing or malformed block; everything
    after it is recomputed."""
    if limit <= 0:
        return NO_PREFIX
    start = time.perf_counter()
    store, B = worker.store, worker.block_size
    keys = keys[: store.lookup_prefix(keys)]
    skip = min(resident // B, limit // B, len(keys))
    blocks = []
    # retain=False: the engine's pool keeps what it loads (TieredStore.get_many)
    for t in store.get_many(keys[skip:], borrow=True, retain=False) if keys[skip:] else []:
        if not _fits(worker, t, full=True):
            break
        blocks.append(t)
    length = (skip + len(blocks)) * B
    tail = None
    if tail_key and tail_start == length and length < limit:
        tail = store.get_many([tail_key], borrow=True, retain=False)[0]
        tail = tail if _fits(worker, tail, full=False) else None
        length += 0 if tail is None else tail.shape[3]
    loaded = blocks + ([tail] if tail is not None else [])
    if not loaded:
        return PrefixKV(None, None, 0, skip)
    nbytes = sum(t.numel() * t.element_size() for t in loaded)
    worker.handoff.observe("load", nbytes, time.perf_counter() - start)
    return PrefixKV(blocks or None, tail, min(length, limit), skip + len(blocks), skip * B)


def _fits(worker: Worker, t: torch.Tensor | None, full: bool) -> bool:
    """A stored tensor matches this engine's layout (a tail may hold fewer tokens)."""
    if t is None or t.dtype != worker.engine.layout.store_dtype or t.dim() != 5:
        return False
    want = worker.engine.layout.block_shape
    tokens_ok = t.shape[3] == want[3] if full else 0 < t.shape[3] < want[3]
    return tokens_ok and t.shape[:3] == want[:3] and t.shape[4] == want[4]
