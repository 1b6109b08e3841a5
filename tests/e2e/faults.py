"""Helpers for the fault-injection tests: streaming with a hook per chunk, bounded polling,
worker counters and metrics, and the KV files on disk."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import httpx

from kvstore.redis_tier import kv_prefix
from tests.e2e.stack import Stack

T = TypeVar("T")
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def poll(fn: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    """fn() until it is truthy, at most `timeout` seconds (synchronisation, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def stream_completion(stack: Stack, body: dict,
                      on_chunk: Callable[[int], None] | None = None) -> str:
    """A streamed /v1/completions; on_chunk(n) runs after the n-th content chunk arrived."""
    parts: list[str] = []
    with httpx.stream("POST", f"{stack.url}/v1/completions", timeout=180,
                      json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        done = False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            assert "error" not in chunk, chunk
            parts.append("".join(c.get("text") or "" for c in chunk["choices"]))
            if on_chunk is not None:
                on_chunk(len(parts))
    assert done, "the stream must end with data: [DONE]"
    return "".join(parts)


def salt() -> str:
    """A fresh key namespace: blocks from earlier runs of the same text cannot be reused."""
    return uuid.uuid4().hex


def run_wave(stack: Stack, body: dict, n: int, started=None) -> list[str]:
    """n concurrent streams of `body`, each its own key namespace; `started` (an Event) is set
    once every stream has its first token."""
    count, lock = [0], threading.Lock()

    def one(_: int) -> str:
        def on_chunk(i: int) -> None:
            with lock:
                count[0] += i == 1
                if count[0] == n and started is not None:
                    started.set()
        return stream_completion(stack, {**body, "cache_salt": salt()}, on_chunk)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def complete(stack: Stack, body: dict, timeout_s: float = 180) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/completions", json={"model": MODEL, **body},
                      timeout=timeout_s)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def counters(url: str) -> dict[str, int]:
    return health(url)["counters"]


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` at url/metrics whose labels include `labels`."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def decode_urls(stack: Stack) -> list[str]:
    return [w["url"] for w in stack.workers() if w["role"] == "decode"]


def kv_files(kv_dir: Path) -> int:
    """Complete blocks on disk (in-progress writes are `.tmp-*` files, renamed when whole)."""
    return sum(1 for _ in kv_dir.glob("*.kv"))


def kv_path(kv_dir: Path, key: str) -> Path:
    """Where the disk tier keeps `key` (kvstore/disk.py names files this way)."""
    return kv_dir / (quote(key, safe="@-_.") + ".kv")


def flip_bytes(path: Path, count: int = 64) -> None:
    """XOR 0xFF into `count` bytes at the middle of the file: inside the tensor payload (the
    header and key take the first few hundred bytes of a ~2.9 MB fp32 block), so the blob
    still parses and only its checksum can tell."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + count] = bytes(b ^ 0xFF for b in data[mid:mid + count])
    path.write_bytes(bytes(data))


def flip_redis_value(client, key: str, count: int = 64) -> None:
    """The same injection on the Redis copy of a block (KEEPTTL: only the bytes change)."""
    data = bytearray(client.get(key))
    mid = len(data) // 2
    data[mid:mid + count] = bytes(b ^ 0xFF for b in data[mid:mid + count])
    client.set(key, bytes(data), keepttl=True)


def redis_block_count(client) -> int:
    """KV values in Redis (under tandem:<cluster>:kv:; ads under tandem:{<cluster>}:workers)."""
    return sum(1 for _ in client.scan_iter(match=f"{kv_prefix('default')}*", count=500))


def start_decode_worker(stack: Stack, port: int, *args: str) -> subprocess.Popen:
    """One more decode worker, outside `tandem serve`: the router only learns of it through
    Redis membership. Same model, dtype and shared disk dir as the stack."""
    log = (stack.workdir / f"decode-{port}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "tandem.cli", "decode", "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, env=stack.env, start_new_session=True)


def stream_partial(stack: Stack, body: dict, got: list[str],
                   on_chunk: Callable[[int], None] | None = None) -> bool:
    """A streamed /v1/completions whose server may die under it: each content chunk's text is
    appended to `got` as it arrives, so a caller sees what the client had when the stream
    broke. True if the stream ended with [DONE], False if it was cut (connection reset, short
    body). A stream that answers anything but 200, or carries an error event, fails."""
    try:
        with httpx.stream("POST", f"{stack.url}/v1/completions", timeout=120,
                          json={"model": MODEL, "stream": True, **body}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                payload = line.removeprefix("data: ")
                if payload == line:
                    continue
                if payload == "[DONE]":
                    return True
                chunk = json.loads(payload)
                assert "error" not in chunk, chunk
                got.append("".join(c.get("text") or "" for c in chunk["choices"]))
                if on_chunk is not None:
                    on_chunk(len(got))
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return False
    return False


def log_lines(stack: Stack, needle: str) -> int:
    """Lines of the stack's log (every child writes to it) that contain `needle`."""
    return sum(needle in line for line in stack.log_path.read_text(errors="replace").splitlines())
