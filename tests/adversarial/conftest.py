"""A hostile-client suite against a real stack: `tandem serve` with 1 prefill + 1 decode worker,
its own Redis (a shared tier and membership) and an internal token, as an operator runs it.

While the suite runs, a canary streams the same greedy request over and over; the last test
checks every run equals the text the quiet stack gave, and that every worker is healthy with a
closed circuit: no case may hurt another client or a worker.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.e2e.stack import Stack
from tests.redis_server import RedisServer

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
INTERNAL_TOKEN = "adversarial-internal-token"
CANARY = {"model": MODEL, "prompt": "List the days of the week, one per line:",
          "max_tokens": 48, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="package")
def redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("adversarial-redis")) as server:
        yield server


@pytest.fixture(scope="package")
def stack(tmp_path_factory, redis):
    with Stack(tmp_path_factory.mktemp("adversarial"), "--redis-url", redis.url,
               "--internal-token", INTERNAL_TOKEN) as s:
        yield s


def stream_text(url: str, body: dict, timeout: float = 120.0, headers: dict | None = None) -> str:
    """The text of a streamed completion (raises on a non-200 or an error event)."""
    parts = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk
            parts += [c["text"] for c in chunk["choices"]]
    return "".join(parts)


class Canary:
    """Streams CANARY in a loop on its own thread; every run's text must equal `want`."""

    def __init__(self, url: str, want: str):
        self.url, self.want = url, want
        self.runs: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="canary", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.runs.append(stream_text(self.url, CANARY))
            except BaseException as e:  # noqa: BLE001 - reported by the last test
                self.errors.append(e)

    def start(self) -> Canary:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=180)


@pytest.fixture(scope="package")
def canary(stack):
    want = stream_text(stack.url, CANARY)  # the quiet stack's text
    c = Canary(stack.url, want).start()
    yield c
    c.stop()


def metric_total(url: str, name: str) -> float:
    """The sum of a Prometheus metric's samples at `url`/metrics, over all labels (0 while it
    has none yet)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((f"{name}{{", f"{name} ")))
