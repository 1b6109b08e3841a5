"""Parsing an OpenAI-style SSE stream into a RequestRecord; pure, so tests need no server.

A stream looks like (one JSON object per `data:` line, blank lines between events):

    data: {"id": "...", "choices": [{"delta": {"role": "assistant", "content": ""}}]}
    data: {"id": "...", "choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]}
    data: {"id": "...", "choices": [{"delta": {}, "finish_reason": "stop"}]}
    data: {"id": "...", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1,
           "prompt_tokens_details": {"cached_tokens": 0}}}
    data: [DONE]

An error after the stream started arrives as `data: {"error": {...}}`. Each `data:` line is
taken as one payload (what OpenAI-compatible servers send), not joined per SSE event.
"""

from __future__ import annotations

import json
from typing import Any

from tandem.bench.records import RequestRecord

DONE = "[DONE]"


def parse_line(line: str) -> str | None:
    """The payload of a `data:` line; None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    return line[len("data:"):].strip()


def error_message(error: Any) -> str:
    """A readable message from `{"error": ...}`, whatever shape the peer gave it."""
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)
    return str(error)


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _choice_text(choice: dict) -> str:
    """New text of a chat delta or a completion choice ('' for role-only or empty chunks)."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        # Reasoning models stream their thinking first; it is output the user waits for.
        text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
    else:
        text = choice.get("text")
    return text if isinstance(text, str) else ""


class StreamAccumulator:
    """Folds payloads and their arrival times (seconds since the request was sent) into a record.

    Owns the record until finish(); the answer text is kept here, not in the record, because
    only multi-turn sessions need it.
    """

    def __init__(self, record: RequestRecord):
        self.record = record
        self.parts: list[str] = []
        self.last_chunk_s: float | None = None
        self.done = False

    def fail(self, message: str) -> None:
        if self.record.error is None:  # keep the first cause; later ones are its echoes
            self.record.error = message

    def feed(self, payload: str, elapsed_s: float) -> None:
        if payload == DONE:
            self.done = True
            return
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            self.fail(f"malformed SSE data: {payload[:200]}")
            return
        if not isinstance(event, dict):
            self.fail(f"unexpected SSE data: {payload[:200]}")
            return
        if "error" in event:
            self.fail(error_message(event["error"]))
            return
        if self.record.response_id is None and isinstance(event.get("id"), str):
            self.record.response_id = event["id"]
        if isinstance(event.get("usage"), dict):
            self._take_usage(event["usage"])
        for choice in event.get("choices") or []:
            if isinstance(choice, dict):
                self._take_choice(choice, elapsed_s)

    def _take_usage(self, usage: dict) -> None:
        # Some servers send usage on every chunk (continuous stats); the last one is final.
        prompt, completion = _as_int(usage.get("prompt_tokens")), _as_int(
            usage.get("completion_tokens"))
        if prompt is None or completion is None:
            return
        r = self.record
        r.usage_reported, r.prompt_tokens, r.completion_tokens = True, prompt, completion
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            r.cached_tokens = _as_int(details.get("cached_tokens"))

    def _take_choice(self, choice: dict, elapsed_s: float) -> None:
        r = self.record
        if choice.get("finish_reason"):
            r.finish_reason = str(choice["finish_reason"])
        text = _choice_text(choice)
        if not text:
            return
        if r.ttft_s is None:
            r.ttft_s = elapsed_s
        else:
            r.itl_s.append(elapsed_s - self.last_chunk_s)
        self.last_chunk_s = elapsed_s
        r.content_chunks += 1
        self.parts.append(text)

    def finish(self, elapsed_s: float) -> str:
        """Closes the record at elapsed_s and returns the answer text."""
        r = self.record
        r.e2e_s = elapsed_s
        if r.error is None and not (self.done or r.finish_reason):
            r.error = "stream ended before [DONE] or a finish_reason"
        r.ok = r.error is None
        text = "".join(self.parts)
        r.output_chars = len(text)
        if not r.usage_reported:
            r.completion_tokens = r.content_chunks  # fallback: one token per content chunk
        return text
