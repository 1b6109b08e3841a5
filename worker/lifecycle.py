"""A worker's life in the cluster: heartbeat while up, drain on SIGTERM.

    SIGTERM ─▶ draining: /generate and /prefill answer 503, /health answers 503, the Redis ad
               is deleted ─▶ in-flight requests finish (up to drain_grace_s) ─▶ uvicorn's own
               graceful shutdown (closes the socket, waits, runs the lifespan exit)

uvicorn installs its SIGTERM handler before the app starts; we wrap it from the lifespan, so a
second SIGTERM (or SIGINT) still stops the server at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from wire.membership import WorkerAd
from worker.heartbeat import Heartbeat

if TYPE_CHECKING:
    from worker.runtime import Worker

log = logging.getLogger(__name__)


def worker_ad(worker: Worker) -> WorkerAd:
    running, waiting = worker.load()
    return WorkerAd(
        url=worker.settings.advertised_url(), role=worker.settings.role, pid=os.getpid(),
        model=worker.lm.name, draining=worker.admission.draining, running=running,
        waiting=waiting, capacity=worker.admission.capacity, instance_id=worker.instance_id,
    )


class Lifecycle:
    """Owns the worker's heartbeat and its drain task."""

    def __init__(self, worker: Worker):
        self.worker = worker
        s = worker.settings
        self.heartbeat = None
        if s.redis_url:
            self.heartbeat = Heartbeat(s.redis_url, lambda: worker_ad(worker),
                                       s.heartbeat_interval_s, s.heartbeat_ttl_s,
                                       s.redis_timeout_s, s.cluster_id, s.internal_token)
        self._drain_task: asyncio.Task | None = None

    async def start(self) -> None:
        if self.heartbeat is not None:
            await self.heartbeat.beat()  # be listed before the first interval passes
            self.heartbeat.start()
        self._hook_sigterm()

    async def stop(self) -> None:
        if self.heartbeat is not None:
            await self.heartbeat.stop()

    def _hook_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # an in-process test server: no signals to take over
        server_exit = signal.getsignal(signal.SIGTERM)
        if not callable(server_exit):
            return  # not under uvicorn: keep the default (terminate)
        loop = asyncio.get_running_loop()

        def on_sigterm(sig: int, frame) -> None:
            if self.worker.admission.draining:  # a second SIGTERM: stop now
                server_exit(sig, frame)
                return
            self.worker.admission.draining = True
            loop.call_soon_threadsafe(self._start_drain, lambda: server_exit(sig, None))

        signal.signal(signal.SIGTERM, on_sigterm)

    def _start_drain(self, server_exit: Callable[[], None]) -> None:
        self._drain_task = asyncio.create_task(self._drain(server_exit), name="drain")

    async def _drain(self, server_exit: Callable[[], None]) -> None:
        grace = self.worker.settings.drain_grace_s
        log.info("SIGTERM: draining %d request(s), up to %.0fs", self.worker.admission.active,
                 grace)
        await self.stop()
        if await self.worker.admission.wait_idle(grace):
            log.info("drained; shutting down")
        else:
            log.warning("grace period over with %d request(s) in flight; shutting down",
                        self.worker.admission.active)
        server_exit()
