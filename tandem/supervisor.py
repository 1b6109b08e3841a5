"""`tandem serve`'s process supervisor: starts each service as a child process, restarts a child
that dies, and shuts everything down on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX_S = 10.0
# SIGTERM → SIGKILL. A worker drains for up to drain_grace_s (10 s), then uvicorn waits up to
# 10 s more for connections; past both, a stream is better cut (the router resumes it).
GRACE_S = 25.0


@dataclass
class Child:
    name: str  # e.g. "decode-0"; also its log tag
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff_s: float = field(default=0.5)

    def spawn(self) -> None:
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env})
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)


class Supervisor:
    def __init__(self, children: list[Child]):
        self.children = children
        self._stopping = threading.Event()

    def run(self) -> int:
        """Blocks until SIGINT/SIGTERM; restarts children that exit meanwhile."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stopping.set())
        for c in self.children:
            c.spawn()
        while not self._stopping.wait(0.2):
            for c in self.children:
                self._check(c)
        self.shutdown()
        return 0

    def _check(self, c: Child) -> None:
        code = c.proc.poll() if c.proc else None
        if code is None:
            return
        # A child that ran a while earns a fresh backoff; a crash loop backs off exponentially.
        if time.monotonic() - c.started_at > 30:
            c.backoff_s = 0.5
        log.warning("%s exited with %s; restarting in %.1fs", c.name, code, c.backoff_s)
        if self._stopping.wait(c.backoff_s):
            return
        c.backoff_s = min(RESTART_BACKOFF_MAX_S, c.backoff_s * 2)
        c.restarts += 1
        c.spawn()

    def shutdown(self) -> None:
        live = [c.proc for c in self.children if c.proc and c.proc.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.info("all services stopped")


def child_argv(command: str, flags: dict[str, object]) -> list[str]:
    argv = [sys.executable, "-m", "tandem.cli", command]
    for name, value in flags.items():
        flag = name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, list):
            argv += [f"--{flag}", ",".join(map(str, value))]
        else:
            argv += [f"--{flag}", str(value)]
    return argv
