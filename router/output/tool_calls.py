"""A chat answer's tool calls: parsed out of its text, whole or while it streams.

By tool mode (router/protocol/tools.py):
- a named function: the text is that function's arguments (the guide made it so). It streams
  as it comes: a first delta with the call's id and name, then `arguments` pieces.
- "required": the text is a JSON array of {"name", "arguments"} (the guide made it so). Its
  calls are known once it ends; each is sent whole then.
- "auto": free text, in which the model may write Hermes `<tool_call>{...}</tool_call>`
  blocks (router/api/chat_prompt.py tells it how). Text before the first block streams as
  content, holding back what could be the start of a tag; from the first tag on, the rest is
  parsed when the answer ends. A block that is not a call stays in the content.
An answer that does not parse (cut by max_tokens) is returned as content, as vLLM does.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from router.protocol.tools import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(slots=True)
class Parsed:
    content: str | None
    calls: list[ToolCall] = field(default_factory=list)


def parse_answer(mode: str, text: str) -> Parsed:
    """The whole answer's content and calls, for a mode other than "none"."""
    if mode == "auto":
        return _parse_auto(text)
    calls = _calls(text) if mode == "required" else _named(mode, text)
    return Parsed(None, calls) if calls else Parsed(text)


def _named(name: str, text: str) -> list[ToolCall]:
    try:
        json.loads(text)
    except ValueError:
        return []
    return [ToolCall(id=call_id(), function=FunctionCall(name=name, arguments=text))]


def _calls(text: str) -> list[ToolCall]:
    """A JSON call {"name", "arguments"} or a list of them -> calls; [] if it is not one."""
    try:
        value: Any = json.loads(text)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    ok = all(isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c
             for c in items)
    if not ok or not items:
        return []
    return [ToolCall(id=call_id(), function=FunctionCall(
        name=c["name"], arguments=json.dumps(c["arguments"]))) for c in items]


def _parse_auto(text: str) -> Parsed:
    calls, kept, last = [], [], 0
    for m in _BLOCK.finditer(text):
        found = _calls(m.group(1).strip())
        kept.append(text[last : m.start()] if found else text[last : m.end()])
        calls += found
        last = m.end()
    content = ("".join(kept) + text[last:]).strip()
    return Parsed(content or None, calls) if calls else Parsed(text)


class ToolCallStream:
    """One streamed choice's deltas: feed() each text piece, finish() at its end. Both return
    (content, tool call deltas) to send, either may be empty."""

    def __init__(self, mode: str):
        self.mode = mode
        self._buf = ""  # held back: "required" all of it, "auto" from a (possible) tag on
        self._opened = False  # named: the call's first delta is out; auto: a tag was seen
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if not text:
            return "", []
        if self.mode == "required":
            self._buf += text
            return "", []
        if self.mode == "auto":
            return self._feed_auto(text), []
        if self._opened:
            return "", [ToolCallDelta(index=0, function=FunctionCallDelta(arguments=text))]
        self._opened, self.num_calls = True, 1
        return "", [ToolCallDelta(index=0, id=call_id(), type="function",
                                  function=FunctionCallDelta(name=self.mode, arguments=text))]

    def _feed_auto(self, text: str) -> str:
        self._buf += text
        if self._opened:
            return ""
        at = self._buf.find(OPEN)
        if at >= 0:
            self._opened = True
            out, self._buf = self._buf[:at], self._buf[at:]
            return out
        keep = _partial_tag(self._buf)
        out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        return out

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        if self.mode not in ("required", "auto") or not self._buf:
            return "", []
        parsed = parse_answer(self.mode, self._buf)
        self._buf = ""
        self.num_calls = len(parsed.calls)
        deltas = [ToolCallDelta(index=i, id=c.id, type="function", function=FunctionCallDelta(
            name=c.function.name, arguments=c.function.arguments))
            for i, c in enumerate(parsed.calls)]
        return parsed.content or "", deltas


def _partial_tag(text: str) -> int:
    """How many trailing characters of `text` could begin OPEN."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
