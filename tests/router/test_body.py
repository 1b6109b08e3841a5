"""Large JSON bodies are parsed and validated on a thread (router/api/body.py), with the same
answers as FastAPI's own parsing gives."""

from __future__ import annotations

import threading

import router.api.body as body_module
from tests.router.conftest import MODEL


def spy_threads(monkeypatch) -> list[str]:
    names = []
    parse = body_module._parse

    def spy(model, raw):
        names.append(threading.current_thread().name)
        return parse(model, raw)

    monkeypatch.setattr(body_module, "_parse", spy)
    return names


def test_a_large_body_is_validated_off_the_event_loop(client, monkeypatch):
    threads = spy_threads(monkeypatch)
    prompt = [7] * 40_000  # ~80 KiB of JSON
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1,
                                             "n": 1, "echo": False})
    assert r.status_code in (200, 400), r.text  # the fake model's context decides
    assert threads and threads[0].startswith("asyncio_")  # the loop's executor, not the loop


def test_a_small_body_is_parsed_in_place(client, monkeypatch):
    threads = spy_threads(monkeypatch)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert threads == []


def test_a_large_invalid_body_gets_the_usual_error(client, monkeypatch):
    threads = spy_threads(monkeypatch)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [7] * 40_000 + ["x"]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith("prompt") and err["type"] == "invalid_request_error"
    assert len(threads) == 1


def test_large_malformed_json_is_400(client):
    raw = b'{"model": "m", "prompt": [' + b"1," * 40_000
    r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"
