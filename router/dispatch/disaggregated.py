"""The production Backend: prefix lookup, prefill on a prefill worker, decode on a decode worker.

    router ──/prefill──▶ prefill worker ──blocks──▶ store ──blocks──▶ decode worker
       └────────────────────/generate (prompt + first token)─────────────┘

Faults (docs/RELIABILITY.md):
- A broken decode stream (killed worker, reset, timeout) resumes on another decode worker with
  prompt + tokens so far; that worker reloads the stored blocks and recomputes only the tail.
  Seeds are always set and sampling is position-deterministic, so the resumed text is the text
  the dead worker would have produced. The request id stays the same, so a retry that lands on
  the same worker supersedes the first attempt instead of generating twice.
- A failed prefill is retried on another prefill worker, else the decode worker prefills.
  The prefill worker's first token goes to the client at once (that is TTFT); a worker that
  dies before storing the KV only costs the decode worker a recompute.
- A worker that refuses (429 full, 503 draining) is skipped without spending the budget;
  when every decode worker refuses a request the client holds no token of, it gets 429
  (BackendOverloaded); one already streaming waits for room instead.
  Full prefill workers are skipped like failed ones: the decode worker prefills.
- Failures spend the request's budget (`max_failovers`), back off with jitter, and strike the
  worker's breaker (kvstore/breaker.py, one per worker: router/dispatch/pool.py). After a
  failure the request waits (bounded) for a worker to come back; a new request with no worker
  ready gets 503 at once.
- A worker that rejects the request itself (400/404/413/422: it would on any worker) ends it
  with BackendRejected, a 400 carrying the worker's message: no failover, no strike, the
  worker's health unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import replace

import httpx

from engine.sequence import TokenEvent
from kvstore import KeyNamespace, block_keys, build_store
from router.dispatch.backend import (
    BackendOverloaded,
    BackendRejected,
    BackendUnavailable,
    GenerateRequest,
)
from router.dispatch.bodies import as_fork, decode_body
from router.dispatch.faults import (
    RetryState,
    WorkerFailed,
    WorkerRefused,
    WorkerRejected,
    backoff_s,
    check_status,
)
from router.dispatch.group import ChoiceGroup
from router.dispatch.kv_route import KVRouter, RoutePrefix
from router.dispatch.membership import Membership
from router.dispatch.pool import WorkerPool, probe_client
from router.dispatch.worker_info import WorkerInfo
from wire.internal_api import (
    INTERNAL_TOKEN_HEADER,
    AbortRequest,
    DecodeRequest,
    PrefillCommitted,
    PrefillRequest,
    PrefillResponse,
    parse_event,
)

log = logging.getLogger(__name__)

# After a failure, how long a request waits for some worker of the role to be back (a worker
# restart under load takes 10-20 s on a 2-vCPU box). The router's idle timeout still applies.
FAILOVER_WAIT_S = 45.0
WAIT_POLL_S = 0.2  # pool re-checks while waiting; probes run every health_interval_s anyway
# How long a call waits for a free connection to the workers. The in-flight bound
# (max_inflight_choices) keeps the pool from filling; when it is full anyway, refusing soon
# (another worker, else 429) beats queueing behind streams that may run for minutes.
POOL_WAIT_S = 5.0
ABORT_TIMEOUT_S = 2.0  # an abort that cannot be delivered at once is not worth waiting for


class DisaggregatedBackend:
    def __init__(self, settings, transport: httpx.AsyncBaseTransport | None = None):
        self.settings = settings
        self.client: httpx.AsyncClient | None = None
        self.pool: WorkerPool | None = None
        self.lookup_store = None
        self.failovers_total = 0  # failed worker calls retried elsewhere (or prefilled locally)
        self.refusals_total = 0  # 429/503 answers that sent a request to another worker
        self._transport = transport  # tests inject a mock transport
        headers = {}
        if settings.internal_token:
            headers[INTERNAL_TOKEN_HEADER] = settings.internal_token
        self._headers = headers

    async def start(self) -> None:
        s = self.settings
        timeout = httpx.Timeout(s.worker_timeout_s, connect=2.0, pool=POOL_WAIT_S)
        limits = httpx.Limits(max_connections=s.worker_max_connections,
                              max_keepalive_connections=s.worker_max_connections)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers,
                                        transport=self._transport)
        membership = Membership(s.redis_url, s.redis_timeout_s, s.cluster_id,
                                s.internal_token) if s.redis_url else None
        # Probes get their own client: a request pool full of streams must not fail them.
        router = KVRouter(s.route_policy, s.route_load_tokens, s.route_balance_abs)
        self.pool = WorkerPool(probe_client(self._headers, self._transport), s.prefill_urls,
                               s.decode_urls, s.health_interval_s, headers=self._headers,
                               membership=membership, models=s.served_models(), router=router)
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

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        req = self.scoped(req)
        state = self.retry_state(req)
        body = decode_body(req)
        handoff = await self.prefill_if_worth_it(req, state)
        if handoff is not None:
            head, rest = handoff
            async with aclosing(rest):
                # TTFT: the client gets the prefill worker's token now, while its KV is stored.
                yield head.event
                state.streaming = True
                committed = await self.await_commit(rest)
            if head.event.finish_reason is not None:
                return
            body = decode_body(req, [head.event.token_id], head if committed else None)
        async for ev in self.decode(body, state, report_cached=handoff is None):
            yield ev

    def generate_group(self, reqs: Sequence[GenerateRequest]) -> list[AsyncIterator[TokenEvent]]:
        """The choices of one prompt, computed once (router/dispatch/group.py)."""
        if len(reqs) == 1:
            return [self.generate(reqs[0])]
        return ChoiceGroup(self, [self.scoped(r, group=reqs[0].request_id) for r in reqs]).members()

    def retry_state(self, req: GenerateRequest, streaming: bool = False) -> RetryState:
        """A request's failover budget, and its prompt for KV-aware routing."""
        return RetryState(self.settings.max_failovers, streaming=streaming, model=req.model,
                          prefix=RoutePrefix(req.token_ids, req.cache_salt))

    def scoped(self, req: GenerateRequest, group: str | None = None) -> GenerateRequest:
        """With the prefix cache off, a request (or a group of choices) still shares its own
        KV through the store, with nobody else: its salt is made unique to it."""
        if self.settings.prefix_cache:
            return req
        return replace(req, cache_salt=f"{req.cache_salt}/{group or req.request_id}")

    async def prefill_if_worth_it(
        self, req: GenerateRequest, state: RetryState, forks: Sequence[GenerateRequest] = ()
    ) -> tuple[PrefillResponse, AsyncIterator] | None:
        cached = await self._cached_tokens(req)
        return await self._prefill(req, state, forks) if self._needs_prefill(req, cached) else None

    async def _cached_tokens(self, req: GenerateRequest) -> int:
        """Leading prompt tokens already in the shared tiers; any failure counts as a miss."""
        health = self.pool.any_health(req.model) if self.pool else None
        if self.lookup_store is None or health is None:
            return 0
        ns = KeyNamespace(health.fingerprint, health.dtype, health.block_size, req.cache_salt)
        keys = block_keys(req.token_ids, ns)
        try:
            async with asyncio.timeout(self.settings.redis_timeout_s * 2):
                n = await asyncio.to_thread(self.lookup_store.lookup_prefix, keys)
        except Exception:  # a store outage is a miss, never a failed request
            log.warning("prefix lookup failed; treating as a miss", exc_info=True)
            return 0
        return n * health.block_size

    def _needs_prefill(self, req: GenerateRequest, cached: int) -> bool:
        """A prefill hop pays for itself only on a long uncached part: a short one is computed
        by the decode worker (Dynamo's conditional disaggregation), which spares the store
        round trip of the whole prefix; all but the last token cached never needs one."""
        if not self.pool.has_role("prefill", req.model):
            return False
        if req.params.prompt_logprobs is not None:
            return True
        uncached = len(req.token_ids) - 1 - cached
        return uncached >= max(1, self.settings.local_prefill_tokens)

    async def _prefill(
        self, req: GenerateRequest, state: RetryState, forks: Sequence[GenerateRequest]
    ) -> tuple[PrefillResponse, AsyncIterator] | None:
        """Try prefill workers in turn: (the reply's first line, the open rest of it), or None
        when the decode worker must prefill itself."""
        body = PrefillRequest(
            request_id=req.request_id, token_ids=list(req.token_ids), params=req.params,
            cache_salt=req.cache_salt, forks=[as_fork(f) for f in forks],
        )
        while (w := self.pool.pick_or_none("prefill", state.excluded, state.model,
                                           state.prefix)) is not None:
            lines = self._call_prefill(w, body)
            try:
                return await anext(lines), lines
            except WorkerRefused as e:
                self.refused(w, e, state)
            except WorkerRejected as e:
                await lines.aclose()
                raise self.rejected(w, e) from e
            except WorkerFailed as e:
                log.warning("prefill on %s failed (%s)", w.url, e)
                if not self.failed(w, state):
                    break
                await asyncio.sleep(backoff_s(state.failures))
            await lines.aclose()
        # Every prefill worker failed or is full: the decode worker computes the prompt itself
        # (whether the request is admitted at all is the decode workers' call).
        log.warning("no prefill worker took %s; decode worker prefills", req.request_id)
        return None

    async def _ndjson(self, w: WorkerInfo, path: str, body) -> AsyncIterator[str]:
        """The non-empty lines of a worker's NDJSON reply, holding a lease on the worker.
        Raises WorkerRefused (429/503, or no free connection in the router's own pool) or
        WorkerFailed (connection, status, cut stream)."""
        async with self.pool.lease(w):
            try:
                async with self.client.stream(
                    "POST", f"{w.url}{path}", content=body.model_dump_json(),
                    headers={"X-Request-Id": body.request_id, "Content-Type": "application/json"},
                ) as r:
                    if r.status_code != 200:
                        await r.aread()
                        check_status(r)
                    async for line in r.aiter_lines():
                        if line:
                            yield line
            except httpx.PoolTimeout as e:
                # Our own pool is full: the worker was never asked, so no strike on it.
                raise WorkerRefused("router connection pool full", draining=False) from e
            except httpx.HTTPError as e:
                raise WorkerFailed(repr(e)) from e

    async def _call_prefill(self, w: WorkerInfo, body: PrefillRequest) -> AsyncIterator:
        """Yields the reply's head (PrefillResponse) as soon as it arrives, then
        PrefillCommitted once the worker has stored the KV."""
        async with aclosing(self._ndjson(w, "/prefill", body)) as lines:
            try:
                head = PrefillResponse.model_validate_json(await anext(lines))
                if len(head.forks) != len(body.forks):
                    raise ValueError(f"{len(head.forks)} fork tokens for {len(body.forks)} forks")
                yield head
                self.pool.mark_ok(w)
                yield PrefillCommitted.model_validate_json(await anext(lines))
            except (ValueError, StopAsyncIteration) as e:
                raise WorkerFailed(f"bad prefill reply: {e!r}") from e

    async def await_commit(self, rest: AsyncIterator) -> bool:
        """Whether the prefill worker stored the prompt's KV. If it died first, the decode
        worker loads whatever blocks did land and recomputes the rest: same output, slower."""
        try:
            await anext(rest)
            return True
        except WorkerFailed as e:
            log.warning("prefill worker failed before storing the KV (%s); decode "
                        "recomputes it", e)
            return False

    async def decode(
        self, body: DecodeRequest, state: RetryState, report_cached: bool
    ) -> AsyncIterator[TokenEvent]:
        """Stream from decode workers until a finish, resuming on another after a failure.
        Only the request's first event reports cached tokens (a resume's count is not news)."""
        while True:
            w = await self.pick_decode(state)
            try:
                async with aclosing(self.call_decode(w, body)) as events:
                    async for ev in events:
                        if not report_cached:
                            ev.num_cached_tokens = None
                        report_cached = False
                        state.streaming = True
                        yield ev
                        if ev.finish_reason is not None:
                            return
                        body.token_ids.append(ev.token_id)
                raise WorkerFailed("stream ended without a finish reason")
            except WorkerRefused as e:
                self.refused(w, e, state)
            except WorkerRejected as e:
                raise self.rejected(w, e) from e
            except WorkerFailed as e:
                log.warning("decode on %s failed after %d tokens (%s)", w.url,
                            len(body.token_ids) - body.num_prompt_tokens, e)
                state.streaming = True
                if not self.failed(w, state):
                    raise BackendUnavailable(
                        f"decode failed {state.failures} times; giving up") from e
                await asyncio.sleep(backoff_s(state.failures))

    async def pick_decode(self, state: RetryState) -> WorkerInfo:
        """A decode worker not yet tried (else a tried one that recovered). Before the client
        has any token the answer is immediate (429 if all refused, 503 if none is up); after,
        the request waits for a worker up to FAILOVER_WAIT_S, retrying refusals as room frees
        up, since an error now would cut a stream the client is reading."""
        while True:
            w = (self.pool.pick_or_none("decode", state.excluded, state.model, state.prefix)
                 or self.pool.pick_or_none("decode", state.refused, state.model, state.prefix))
            if w is not None:
                return w
            if not state.streaming:
                if state.busy is not None:
                    raise BackendOverloaded("every decode worker is at capacity", state.busy)
                raise BackendUnavailable("no healthy decode worker is available")
            state.deadline = state.deadline or time.monotonic() + FAILOVER_WAIT_S
            if time.monotonic() >= state.deadline:
                raise BackendUnavailable(f"no decode worker recovered in {FAILOVER_WAIT_S:g} s")
            state.refused.clear()  # a full worker may have room by the next look
            await asyncio.sleep(WAIT_POLL_S)

    async def call_decode(self, w: WorkerInfo, body: DecodeRequest) -> AsyncIterator[TokenEvent]:
        async with aclosing(self._ndjson(w, "/generate", body)) as lines:
            marked = False
            async for line in lines:
                try:
                    ev = parse_event(line)
                except ValueError as e:  # a line cut short by a dying worker
                    raise WorkerFailed(f"bad stream line: {e}") from e
                if not marked:
                    self.pool.mark_ok(w)
                    marked = True
                yield ev

    async def abort(self, w: WorkerInfo, request_id: str) -> None:
        """Best effort: stop one sequence of a call that carries others (its stream stays
        open for them). If this fails, the sequence runs to its own end, unread."""
        try:
            r = await self.client.post(f"{w.url}/abort", content=AbortRequest(
                request_id=request_id).model_dump_json(), headers={
                "Content-Type": "application/json"}, timeout=ABORT_TIMEOUT_S)
            r.raise_for_status()
        except httpx.HTTPError as e:
            log.info("abort of %s on %s failed (%r)", request_id, w.url, e)

    # --- fault bookkeeping --------------------------------------------------------------------

    def refused(self, w: WorkerInfo, e: WorkerRefused, state: RetryState) -> None:
        log.info("%s worker %s refused (%s); trying another", w.role, w.url, e)
        self.refusals_total += 1
        state.refuse(w.url, e)
        if e.draining:
            self.pool.mark_draining(w)

    def rejected(self, w: WorkerInfo, e: WorkerRejected) -> BackendRejected:
        """The worker answered, so it is fine; the request is not, and the client hears why."""
        log.info("%s worker %s rejected the request (%d): %s", w.role, w.url, e.status, e)
        self.pool.mark_ok(w)
        return BackendRejected(str(e), e.param, e.code)

    def failed(self, w: WorkerInfo, state: RetryState) -> bool:
        """Record a failed call; True if the request may retry."""
        self.pool.mark_failed(w)
        if not state.spend(w.url):
            return False
        self.failovers_total += 1
        return True
