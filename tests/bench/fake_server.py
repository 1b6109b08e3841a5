"""A deterministic OpenAI-shaped streaming server for bench tests; no model involved.

Token rules, so tests can predict every count:
    prompt_tokens      whitespace-separated words of all message contents (or of the prompt)
    completion_tokens  max_tokens; content chunk i is "w{i} "
    cached_tokens      longest word prefix shared with any earlier prompt, rounded down to
                       whole blocks of BLOCK words (like a paged prefix cache)
It logs each response id with the usage it sent and the prompt words it saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

MODEL = "fake-model"
BLOCK = 8  # words per cache block


@dataclass(slots=True)
class ServerLog:
    """Owned by one app: prompts seen (for cached_tokens) and what each response reported."""

    prompts: list[list[str]] = field(default_factory=list)
    usage: dict[str, dict] = field(default_factory=dict)
    prompt_words: dict[str, list[str]] = field(default_factory=dict)

    def cached(self, words: list[str]) -> int:
        best = 0
        for seen in self.prompts:
            n = 0
            while n < min(len(seen), len(words)) and seen[n] == words[n]:
                n += 1
            best = max(best, n)
        return best // BLOCK * BLOCK


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _chunks(rid: str, chat: bool, body: dict, usage: dict):
    """The event sequence of one response: role chunk (chat), content, finish, usage, DONE."""
    def choice(text: str | None, finish: str | None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish}
        return {"index": 0, "text": text or "", "finish_reason": finish}

    base = {"id": rid, "model": MODEL, "object": "chat.completion.chunk" if chat else
            "text_completion"}
    if chat:  # real servers open with an empty role chunk; it must not count as the first token
        yield _sse(base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
    for i in range(body["max_tokens"]):
        yield _sse(base | {"choices": [choice(f"w{i} ", None)]})
    yield _sse(base | {"choices": [choice(None, "length")]})
    if (body.get("stream_options") or {}).get("include_usage"):
        yield _sse(base | {"choices": [], "usage": usage})
    yield _sse("[DONE]")


def _respond(log: ServerLog, body: dict, words: list[str], chat: bool) -> StreamingResponse:
    rid = f"cmpl-{len(log.usage)}"
    usage = {"prompt_tokens": len(words), "completion_tokens": body["max_tokens"],
             "total_tokens": len(words) + body["max_tokens"],
             "prompt_tokens_details": {"cached_tokens": log.cached(words)}}
    log.prompts.append(words)
    log.usage[rid] = usage
    log.prompt_words[rid] = words
    return StreamingResponse(_chunks(rid, chat, body, usage), media_type="text/event-stream")


def create_app() -> FastAPI:
    app = FastAPI()
    app.state.log = ServerLog()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        words = [w for m in body["messages"] for w in m["content"].split()]
        return _respond(app.state.log, body, words, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        return _respond(app.state.log, body, body["prompt"].split(), chat=False)

    return app
