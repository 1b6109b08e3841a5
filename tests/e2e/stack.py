"""Runs `tandem serve` as a user would: a real process tree on loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

READY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """`tandem serve` with its own port, disk cache dir and log file."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"serve-{self.port}.log"
        # --local-prefill-tokens 64: prompts of a block or more take the prefill hop, so the
        # tests' short prompts (~100 tokens) still exercise the disaggregated path.
        self.args = [
            "--port", str(self.port), "--dtype", "float32",
            "--disk-cache-dir", str(workdir / "kv"), "--local-prefill-tokens", "64", *args,
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Stack:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "serve", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        self.wait_ready()
        return self

    def wait_ready(self, want: bool = True, timeout: float = READY_TIMEOUT_S) -> None:
        """Polls /ready until it answers `want` (bounded); fails fast if serve died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"tandem serve exited:\n{self.log_tail()}"
            try:
                ok = httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok == want:
                return
            time.sleep(0.2)
        raise AssertionError(f"/ready never became {want}:\n{self.log_tail()}")

    def workers(self) -> list[dict]:
        r = httpx.get(f"{self.url}/workers", timeout=5)
        r.raise_for_status()
        return r.json()["workers"]

    def worker_health(self, role: str) -> list[dict]:
        """Each worker's own /health (counters), read directly."""
        return [httpx.get(f"{w['url']}/health", timeout=5).json()
                for w in self.workers() if w["role"] == role]

    def wait_all_healthy(self, timeout: float = READY_TIMEOUT_S) -> list[dict]:
        """Polls /workers until every worker the router knows is healthy (bounded); e.g. after
        a kill, until the supervisor's restart is back in rotation."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"tandem serve exited:\n{self.log_tail()}"
            try:
                workers = self.workers()
            except httpx.HTTPError:
                workers = []
            if workers and all(w["healthy"] and w["circuit"] == "closed" for w in workers):
                return workers
            time.sleep(0.2)
        raise AssertionError(f"workers never all healthy:\n{self.log_tail()}")

    def child_pids(self, command: str) -> list[int]:
        """Pids of the live children of `tandem serve` that run `tandem.cli <command>` (router,
        prefill or decode), read from /proc. A killed child the supervisor has not reaped yet is
        a zombie with an empty cmdline, so it is not listed."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
            if ppid == self.proc.pid and b"tandem.cli" in argv:
                at = argv.index(b"tandem.cli") + 1
                if at < len(argv) and argv[at] == command.encode():
                    pids.append(int(stat.parent.name))
        return pids

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
