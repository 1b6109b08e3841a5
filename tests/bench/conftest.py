"""Fixtures: the fake OpenAI server on a free loopback port, served by uvicorn in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from tests.bench.fake_server import ServerLog, create_app

READY_TIMEOUT_S = 10.0


@dataclass(slots=True)
class FakeServer:
    url: str
    app: FastAPI

    @property
    def log(self) -> ServerLog:
        return self.app.state.log


def _wait_accepting(url: str, thread: threading.Thread) -> None:
    """Bounded polling until the server answers; fails fast if its thread died."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert thread.is_alive(), "uvicorn thread exited during startup"
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.02)
    raise AssertionError(f"fake server at {url} never accepted")


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """A fresh app per test, so the prefix 'cache' and the usage log start empty."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the bound socket goes to uvicorn: no port race
    port = sock.getsockname()[1]
    app = create_app()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_accepting(url, thread)
        yield FakeServer(url=url, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
