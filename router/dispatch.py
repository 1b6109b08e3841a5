"""The production Backend: prefix lookup, prefill on a prefill worker, decode on a decode worker.

    router ──/prefill──▶ prefill worker ──blocks──▶ store ──blocks──▶ decode worker
       └────────────────────/generate (prompt + first token)─────────────┘

A broken decode stream is resumed on another decode worker with prompt + tokens so far; that
worker reloads the stored blocks and recomputes only the tail. Seeds are always set, so the
resumed text is the text the dead worker would have produced.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator

import httpx

from kvstore import KeyNamespace, block_keys, build_store
from router.backend import BackendUnavailable, GenerateEvent, GenerateRequest
from router.pool import WorkerInfo, WorkerPool
from tandem.internal_api import (
    INTERNAL_TOKEN_HEADER,
    DecodeRequest,
    PrefillRequest,
    PrefillResponse,
    WireEvent,
    params_to_wire,
)

log = logging.getLogger(__name__)


class WorkerFailed(Exception):
    """A worker call broke (connection, status, truncated stream)."""


def to_event(w: WireEvent, **extra) -> GenerateEvent:
    return GenerateEvent(
        token_id=w.token_id, logprob=w.logprob, top_logprobs=w.top_logprobs,
        finish_reason=w.finish_reason, **extra,
    )


class DisaggregatedBackend:
    def __init__(self, settings):
        self.settings = settings
        self.client: httpx.AsyncClient | None = None
        self.pool: WorkerPool | None = None
        self.lookup_store = None
        self.failovers_total = 0
        headers = {}
        if settings.internal_token:
            headers[INTERNAL_TOKEN_HEADER] = settings.internal_token
        self._headers = headers

    async def start(self) -> None:
        s = self.settings
        timeout = httpx.Timeout(s.worker_timeout_s, connect=2.0)
        self.client = httpx.AsyncClient(timeout=timeout, headers=self._headers)
        self.pool = WorkerPool(
            self.client, s.prefill_urls, s.decode_urls, s.health_interval_s, headers=self._headers
        )
        await self.pool.start()
        config = s.store_config(lookup=True) if s.prefix_cache else None
        if config is not None:
            self.lookup_store = await asyncio.to_thread(build_store, config)

    async def close(self) -> None:
        if self.pool:
            await self.pool.close()
        if self.client:
            await self.client.aclose()
        if self.lookup_store is not None:
            self.lookup_store.close()

    async def ready(self) -> bool:
        return self.pool is not None and self.pool.ready()

    async def workers(self) -> list[dict]:
        return [w.summary() for w in self.pool.workers()] if self.pool else []

    # --- generation ---------------------------------------------------------------------------

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        cached = await self._cached_tokens(req)
        tokens = list(req.token_ids)
        body = DecodeRequest(
            request_id=req.request_id, token_ids=tokens, num_prompt_tokens=len(tokens),
            params=params_to_wire(req.params), cache_salt=req.cache_salt,
        )
        pre = await self._prefill(req) if self._needs_prefill(req, cached) else None
        if pre is not None:
            first = to_event(pre.event, num_cached_tokens=pre.num_cached_tokens,
                             prompt_logprobs=pre.event.prompt_logprobs)
            yield first
            if first.finish_reason is not None:
                return
            body.token_ids = tokens + [first.token_id]
            body.tail_key, body.tail_start = pre.tail_key, pre.tail_start
        async for ev in self._decode_with_failover(body, report_cached=pre is None):
            yield ev

    async def _cached_tokens(self, req: GenerateRequest) -> int:
        """Leading prompt tokens already in the shared tiers; any failure counts as a miss."""
        health = self.pool.any_health() if self.pool else None
        if self.lookup_store is None or health is None:
            return 0
        ns = KeyNamespace(health.fingerprint, health.dtype, health.block_size, req.cache_salt)
        keys = block_keys(req.token_ids, ns)
        try:
            n = await asyncio.wait_for(
                asyncio.to_thread(self.lookup_store.lookup_prefix, keys),
                self.settings.redis_timeout_s * 2,
            )
        except Exception:  # a store outage is a miss, never a failed request
            log.warning("prefix lookup failed; treating as a miss", exc_info=True)
            return 0
        return n * health.block_size

    def _needs_prefill(self, req: GenerateRequest, cached: int) -> bool:
        """Skip the prefill hop when less than a block remains: the decode worker computes it."""
        if not self.pool.has_role("prefill"):
            return False
        if req.params.prompt_logprobs is not None:
            return True
        block = (self.pool.any_health().block_size if self.pool.any_health() else 64)
        return len(req.token_ids) - 1 - cached >= block

    async def _prefill(self, req: GenerateRequest) -> PrefillResponse | None:
        """Try prefill workers in turn; None means the decode worker must prefill itself."""
        body = PrefillRequest(
            request_id=req.request_id, token_ids=list(req.token_ids),
            params=params_to_wire(req.params), cache_salt=req.cache_salt,
        )
        tried: set[str] = set()
        for attempt in range(1 + self.settings.max_failovers):
            try:
                w = self.pool.pick("prefill", exclude=tried)
            except BackendUnavailable:
                break
            tried.add(w.url)
            try:
                return await self._call_prefill(w, body)
            except WorkerFailed as e:
                log.warning("prefill on %s failed (%s); attempt %d", w.url, e, attempt + 1)
                self.pool.mark_failed(w)
                self.failovers_total += 1
        log.warning("no prefill worker succeeded for %s; decode worker prefills", req.request_id)
        return None

    async def _call_prefill(self, w: WorkerInfo, body: PrefillRequest) -> PrefillResponse:
        async with self.pool.lease(w):
            try:
                r = await self.client.post(f"{w.url}/prefill", json=body.model_dump())
            except httpx.HTTPError as e:
                raise WorkerFailed(repr(e)) from e
        if r.status_code != 200:
            raise WorkerFailed(f"status {r.status_code}: {r.text[:200]}")
        return PrefillResponse.model_validate_json(r.content)

    async def _decode_with_failover(
        self, body: DecodeRequest, report_cached: bool
    ) -> AsyncIterator[GenerateEvent]:
        tried: set[str] = set()
        for attempt in range(1 + self.settings.max_failovers):
            w = self._pick_decode(tried)
            tried.add(w.url)
            try:
                async for wire in self._call_decode(w, body):
                    cached = wire.num_cached_tokens if report_cached else None
                    report_cached = False
                    yield to_event(wire, num_cached_tokens=cached,
                                   prompt_logprobs=wire.prompt_logprobs)
                    if wire.finish_reason is not None:
                        return
                    body.token_ids.append(wire.token_id)
                raise WorkerFailed("stream ended without a finish reason")
            except WorkerFailed as e:
                log.warning("decode on %s failed after %d tokens (%s); attempt %d",
                            w.url, len(body.token_ids) - body.num_prompt_tokens, e, attempt + 1)
                self.pool.mark_failed(w)
                self.failovers_total += 1
                await asyncio.sleep(min(1.0, 0.05 * 2**attempt) * (1 + random.random()))
        raise BackendUnavailable("decode failed on every worker tried")

    def _pick_decode(self, tried: set[str]) -> WorkerInfo:
        try:
            return self.pool.pick("decode", exclude=tried)
        except BackendUnavailable:
            return self.pool.pick("decode")  # only the failed ones left: retry one of them

    async def _call_decode(self, w: WorkerInfo, body: DecodeRequest) -> AsyncIterator[WireEvent]:
        async with self.pool.lease(w):
            try:
                async with self.client.stream(
                    "POST", f"{w.url}/generate", json=body.model_dump()
                ) as r:
                    if r.status_code != 200:
                        raise WorkerFailed(f"status {r.status_code}")
                    async for line in r.aiter_lines():
                        if line:
                            yield WireEvent.model_validate_json(line)
            except httpx.HTTPError as e:
                raise WorkerFailed(repr(e)) from e
