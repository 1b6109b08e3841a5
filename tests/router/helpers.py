"""Small helpers shared by the router tests."""

from __future__ import annotations

import json
from typing import Any

from tests.router.conftest import MODEL

USER = [{"role": "user", "content": "Say hello."}]


def cmpl(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def sse_payloads(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded; "[DONE]" stays a string."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_text(payloads: list[Any], index: int = 0) -> str:
    """The text of one choice across completion or chat chunks."""
    parts = []
    for p in payloads:
        if p == "[DONE]":
            continue
        for c in p["choices"]:
            if c["index"] == index:
                parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    return "".join(parts)


def assert_envelope(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error envelope with this status and `param` (and `code`, unless None)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err
