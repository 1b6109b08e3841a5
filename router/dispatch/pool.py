"""The router's view of its workers: discovery, health probes, load, least-loaded choice,
and a circuit breaker per worker (kvstore/breaker.py). Probes decide whether a worker is up;
its breaker catches a worker that answers /health but fails requests, so it stops taking traffic
for a while instead of failing every request sent to it.

A configured URL whose host name resolves to several addresses (compose `--scale decode=2`
behind one service name) becomes one worker per address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import httpx

from router.dispatch.backend import BackendUnavailable
from router.dispatch.kv_route import KVRouter, ResidentView, RoutePrefix
from router.dispatch.membership import Membership
from router.dispatch.worker_info import WorkerInfo, load_key
from wire.internal_api import KVSummary, WorkerHealth
from wire.membership import WorkerAd

log = logging.getLogger(__name__)

# A probe that takes longer than this counts as failed. Waiting for one of the probe client's
# connections does not: with many workers a probe round may queue.
PROBE_TIMEOUT = httpx.Timeout(2.0, pool=None)
PROBE_CONNECTIONS = 32  # a round probes every worker at once; more than this queue briefly


def probe_client(headers: dict, transport: httpx.AsyncBaseTransport | None = None
                 ) -> httpx.AsyncClient:
    """The pool's own small client for /health, apart from the one that carries requests."""
    limits = httpx.Limits(max_connections=PROBE_CONNECTIONS,
                          max_keepalive_connections=PROBE_CONNECTIONS)
    return httpx.AsyncClient(timeout=PROBE_TIMEOUT, limits=limits, headers=headers,
                             transport=transport)


async def expand_url(url: str) -> list[str]:
    """One URL per address when a service name resolves to several (DNS round robin)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host == "localhost" or _is_ip(host):
        return [url]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, parts.port, family=socket.AF_INET, type=socket.SOCK_STREAM
        )
    except OSError:
        return [url]
    addrs = sorted({info[4][0] for info in infos})
    if len(addrs) <= 1:
        return [url]
    return [urlunsplit(parts._replace(netloc=f"{a}:{parts.port}")) for a in addrs]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class WorkerPool:
    """Owns every WorkerInfo. Health comes from probes; membership (optional) adds the workers
    that heartbeat in Redis and removes them when their ad lapses; request outcomes drive each
    worker's breaker. `client` carries the probes only (see probe_client); close() closes it.

    `models` maps the model a worker reports (its `--model`) to the served name requests use.
    With one served model every worker serves it, whatever it reports; with several, a worker
    serves the one it reports, and one reporting a model this router does not serve gets no
    traffic."""

    def __init__(
        self, client: httpx.AsyncClient, prefill_urls: list[str], decode_urls: list[str],
        probe_interval_s: float = 1.0, unhealthy_after: int = 2, headers: dict | None = None,
        membership: Membership | None = None, models: dict[str, str] | None = None,
        router: KVRouter | None = None,
    ):
        self._client = client
        self._configured = {"prefill": prefill_urls, "decode": decode_urls}
        self._workers: dict[str, WorkerInfo] = {}
        self._interval = probe_interval_s
        self._unhealthy_after = unhealthy_after
        self._headers = headers or {}
        self._membership = membership
        self._models = models or {}
        self._names = set(self._models.values())  # the served names
        self._task: asyncio.Task | None = None
        self.router = router or KVRouter(policy="least_loaded")

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._probe_loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._membership is not None:
            await self._membership.close()
        await self._client.aclose()

    def workers(self, role: str | None = None) -> list[WorkerInfo]:
        return [w for w in self._workers.values() if role is None or w.role == role]

    def serves(self, model: str | None) -> list[WorkerInfo]:
        """Workers of `model` (None, or a router of one model: all), counting those no probe
        has reached yet."""
        if model is None or len(self._names) <= 1:
            return list(self._workers.values())
        return [w for w in self._workers.values() if w.model is None or w.model == model]

    def has_role(self, role: str, model: str | None = None) -> bool:
        if not self._workers:
            return bool(self._configured[role])
        return any(w.role == role for w in self.serves(model))

    def ready(self) -> bool:
        """Every served model has a healthy decode worker (and a prefill one, if it has any)."""
        return all(self._model_ready(m) for m in self._names or {None})

    def _model_ready(self, model: str | None) -> bool:
        need = ["decode"] + (["prefill"] if self.has_role("prefill", model) else [])
        return all(any(w.healthy and w.role == r for w in self.serves(model)) for r in need)

    def pick(self, role: str, exclude: set[str] = frozenset(), model: str | None = None,
             prefix: RoutePrefix | None = None) -> WorkerInfo:
        """pick_or_none, or BackendUnavailable."""
        w = self.pick_or_none(role, exclude, model, prefix)
        if w is None:
            raise BackendUnavailable(f"no healthy {role} worker is available")
        return w

    def pick_or_none(self, role: str, exclude: set[str] = frozenset(),
                     model: str | None = None, prefix: RoutePrefix | None = None
                     ) -> WorkerInfo | None:
        """An available worker of `role`, not in `exclude`: the least loaded, or with a
        prefix, the one KV-aware routing picks (router/dispatch/kv_route.py)."""
        candidates = [w for w in self.serves(model) if w.role == role and w.healthy
                      and w.alias_of is None and w.url not in exclude
                      and w.breaker.available()]
        if not candidates:
            return None
        return self.router.choose(candidates, prefix, load_key)

    def any_health(self, model: str | None = None) -> WorkerHealth | None:
        for w in self.serves(model):
            if w.healthy and w.health is not None:
                return w.health
        return None

    @contextlib.asynccontextmanager
    async def lease(self, worker: WorkerInfo) -> AsyncIterator[WorkerInfo]:
        worker.inflight += 1
        # is this request the half-open trial? (one event loop: nothing runs between the calls)
        trial = worker.breaker.state() == "half_open" and worker.breaker.allow()
        try:
            yield worker
        finally:
            worker.inflight -= 1
            if trial:
                worker.breaker.end_trial()  # resolved or not, the next request may try

    def mark_ok(self, worker: WorkerInfo) -> None:
        worker.breaker.succeeded()

    def mark_failed(self, worker: WorkerInfo) -> None:
        """A request to it broke: out of rotation until a probe succeeds, and one more strike
        on its breaker."""
        worker.healthy = False
        worker.breaker.failed()
        if worker.breaker.state() == "open":
            log.warning("%s worker %s: circuit open after %d failures", worker.role,
                        worker.url, worker.breaker.consecutive)

    def mark_draining(self, worker: WorkerInfo) -> None:
        """It refused with 503 (shutting down): skip it until a probe says otherwise."""
        worker.healthy = False

    # --- discovery and probes -----------------------------------------------------------------

    async def refresh(self) -> None:
        """One round: configured URLs, then Redis membership (if any), then probe everyone."""
        for role, urls in self._configured.items():
            for configured in urls:
                for url in await expand_url(configured):
                    self._workers.setdefault(url, WorkerInfo(url, role))
        if self._membership is not None:
            ads = await self._membership.scan()
            if ads is not None:
                self.sync_members(ads)
        await asyncio.gather(*(self._probe(w) for w in list(self._workers.values())))

    def _remove(self, w: WorkerInfo) -> None:
        del self._workers[w.url]
        for x in self._workers.values():
            if x.alias_of == w.url:
                x.alias_of = None  # its next probe decides again

    def sync_members(self, ads: list[WorkerAd]) -> None:
        """Add advertised workers; drop discovered ones whose ad is gone two listings in a row
        (the ad's TTL already covers missed heartbeats; the second listing rides out a Redis
        restart, which forgets every ad until the next beat)."""
        seen = set()
        for ad in ads:
            seen.add(ad.url)
            w = self._workers.get(ad.url)
            if w is None:
                w = self._workers[ad.url] = WorkerInfo(ad.url, ad.role, discovered=True)
                log.info("discovered %s worker %s (pid %d)", ad.role, ad.url, ad.pid)
            w.missing_scans = 0
            if ad.draining:
                w.healthy = False
        for w in list(self._workers.values()):
            if not w.discovered or w.url in seen:
                continue
            w.missing_scans += 1
            if w.missing_scans >= 2:
                log.warning("%s worker %s stopped heartbeating; removed", w.role, w.url)
                self._remove(w)

    async def _probe(self, w: WorkerInfo) -> None:
        try:
            r = await self._client.get(f"{w.url}/health", timeout=PROBE_TIMEOUT,
                                       headers=self._headers)
            r.raise_for_status()
            health = WorkerHealth.model_validate(r.json())
        except (httpx.HTTPError, ValueError):
            w.failures += 1
            if w.failures >= self._unhealthy_after or not w.healthy:
                w.healthy = False
            return
        served = self._served(health.model)
        if served is None:
            if w.health is None:  # log once, not every probe round
                log.warning("ignoring %s: it serves %r, which this router does not", w.url,
                            health.model)
            w.health, w.healthy = health, False
            return
        w.model = served
        if w.discovered and not self._compatible(w, health):
            if w.health is None:  # log once, not every probe round
                log.warning("ignoring %s: its model/KV layout differs from the pool's", w.url)
            w.health, w.healthy = health, False
            return
        if w.health is not None and (w.health.pid, w.health.instance_id) != (
                health.pid, health.instance_id):
            w.breaker.reset()  # another process now: the old one's failures are not its
            w.resident = None
        if not w.healthy:
            log.info("%s worker %s is healthy (pid %d)", w.role, w.url, health.pid)
        w.health, w.instance_id = health, health.instance_id
        w.healthy, w.failures, w.last_ok = True, 0, time.monotonic()
        self._dedupe(w)
        if self.router.policy == "kv" and w.alias_of is None:
            await self._fetch_summary(w, health)

    def _dedupe(self, w: WorkerInfo) -> None:
        """Two URLs of one process (compose's service address and the URL the worker
        advertises) are one worker: the configured URL (else the smaller) carries its traffic,
        the other is an alias no request is sent to, so load is counted once and a failover
        never retries "elsewhere" on the same process."""
        w.alias_of = None
        if not w.instance_id:
            return
        twin = next((x for x in self._workers.values() if x is not w and x.alias_of is None
                     and x.healthy and x.instance_id == w.instance_id), None)
        if twin is None:
            return
        keep, alias = sorted((w, twin), key=lambda x: (x.discovered, x.url))
        alias.alias_of = keep.url
        if alias is twin:
            log.info("%s and %s are one %s worker (instance %s)", keep.url, alias.url,
                     keep.role, keep.instance_id[:8])

    async def _fetch_summary(self, w: WorkerInfo, health: WorkerHealth) -> None:
        """Its resident-page filter, when /health says it changed (bounded: one fetch per
        worker per probe round). A failed fetch keeps the old one: routing is a hint."""
        if w.resident is not None and w.resident.version == health.kv_summary_version:
            return
        try:
            r = await self._client.get(f"{w.url}/kv_summary", timeout=PROBE_TIMEOUT,
                                       headers=self._headers)
            r.raise_for_status()
            w.resident = ResidentView.from_summary(KVSummary.model_validate(r.json()))
        except (httpx.HTTPError, ValueError) as e:
            log.debug("kv summary of %s unavailable (%r)", w.url, e)

    def _served(self, reported: str) -> str | None:
        if len(self._names) <= 1:
            return next(iter(self._names), reported)
        return self._models.get(reported)

    def _compatible(self, w: WorkerInfo, health: WorkerHealth) -> bool:
        """A discovered worker must share the weights and KV layout of the others serving its
        model: it reads and writes the same blocks, and resumes their streams."""
        ref = next((x.health for x in self._workers.values() if x is not w and x.healthy
                    and x.health is not None and x.model == w.model), None)
        layout = (health.fingerprint, health.dtype, health.block_size)
        return ref is None or layout == (ref.fingerprint, ref.dtype, ref.block_size)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:  # a probe bug must not kill discovery
                log.exception("worker probe failed")
