"""The router's view of its workers: discovery, health probes, load, least-loaded choice.

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
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from router.backend import BackendUnavailable
from tandem.internal_api import WorkerHealth

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerInfo:
    url: str
    role: str  # "prefill" | "decode"
    healthy: bool = False
    failures: int = 0  # consecutive failed probes or requests
    inflight: int = 0  # requests this router has open on it
    health: WorkerHealth | None = None
    last_ok: float = 0.0

    def summary(self) -> dict:
        h = self.health
        return {
            "url": self.url, "role": self.role, "healthy": self.healthy, "inflight": self.inflight,
            "running": h.running if h else None, "pid": h.pid if h else None,
            "failures": self.failures, "counters": h.counters if h else {},
        }


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
    def __init__(
        self, client: httpx.AsyncClient, prefill_urls: list[str], decode_urls: list[str],
        probe_interval_s: float = 1.0, unhealthy_after: int = 2, headers: dict | None = None,
    ):
        self._client = client
        self._configured = {"prefill": prefill_urls, "decode": decode_urls}
        self._workers: dict[str, WorkerInfo] = {}
        self._interval = probe_interval_s
        self._unhealthy_after = unhealthy_after
        self._headers = headers or {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.probe_all()
        self._task = asyncio.create_task(self._probe_loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def workers(self, role: str | None = None) -> list[WorkerInfo]:
        return [w for w in self._workers.values() if role is None or w.role == role]

    def has_role(self, role: str) -> bool:
        return bool(self._configured[role])

    def ready(self) -> bool:
        need = ["decode"] + (["prefill"] if self.has_role("prefill") else [])
        return all(any(w.healthy for w in self.workers(r)) for r in need)

    def pick(self, role: str, exclude: set[str] = frozenset()) -> WorkerInfo:
        """The healthy worker of `role` with the fewest requests in flight."""
        candidates = [w for w in self.workers(role) if w.healthy and w.url not in exclude]
        if not candidates:
            raise BackendUnavailable(f"no healthy {role} worker is available")
        return min(candidates, key=lambda w: (w.inflight, w.health.running if w.health else 0))

    def any_health(self) -> WorkerHealth | None:
        for w in self._workers.values():
            if w.healthy and w.health is not None:
                return w.health
        return None

    @contextlib.asynccontextmanager
    async def lease(self, worker: WorkerInfo) -> AsyncIterator[WorkerInfo]:
        worker.inflight += 1
        try:
            yield worker
        finally:
            worker.inflight -= 1

    def mark_failed(self, worker: WorkerInfo) -> None:
        """A request to it broke: take it out of rotation until a probe succeeds."""
        worker.failures += 1
        worker.healthy = False

    async def probe_all(self) -> None:
        for role, urls in self._configured.items():
            for configured in urls:
                for url in await expand_url(configured):
                    self._workers.setdefault(url, WorkerInfo(url, role))
        await asyncio.gather(*(self._probe(w) for w in list(self._workers.values())))

    async def _probe(self, w: WorkerInfo) -> None:
        try:
            r = await self._client.get(f"{w.url}/health", timeout=2.0, headers=self._headers)
            r.raise_for_status()
            w.health = WorkerHealth.model_validate(r.json())
        except (httpx.HTTPError, ValueError):
            w.failures += 1
            if w.failures >= self._unhealthy_after or not w.healthy:
                w.healthy = False
            return
        if not w.healthy:
            log.info("%s worker %s is healthy (pid %d)", w.role, w.url, w.health.pid)
        w.healthy, w.failures, w.last_ok = True, 0, time.monotonic()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.probe_all()
            except Exception:  # a probe bug must not kill discovery
                log.exception("worker probe failed")
