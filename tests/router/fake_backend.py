"""A scripted Backend: each generate() plays a list of TokenEvents, and records what happened.

The default script replies with a fixed text that depends on the seed (so n>1 choices differ),
ends with EOS, honours max_tokens, logprobs and prompt_logprobs with made-up but deterministic
numbers that tests can recompute with the helpers below.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from engine.sequence import TokenEvent
from router.dispatch.backend import BackendError, BackendUnavailable, GenerateRequest

Script = Callable[[GenerateRequest], list[TokenEvent]]

# Multi-byte on purpose: CJK and an emoji split over several byte-level BPE tokens.
REPLY = "Hello world! 你好 😀 seed {seed}. The end."
CACHED_TOKENS = 3  # what the fake reports as served from the prefix cache


def reply_text(seed: int | None) -> str:
    return REPLY.format(seed=(seed or 0) % 997)


def reply_ids(tokenizer: PreTrainedTokenizerBase, seed: int | None) -> list[int]:
    return tokenizer.encode(reply_text(seed), add_special_tokens=False)


def token_logprob(i: int) -> float:
    return -0.25 * (i + 1)


def top_list(token_id: int, logprob: float, k: int, vocab: int) -> list[tuple[int, float]]:
    """k alternatives, best first; the chosen token leads."""
    others = [((token_id + 1 + m) % vocab, logprob - 1.0 - m) for m in range(max(k - 1, 0))]
    return ([(token_id, logprob)] + others)[:k]


def prompt_logprob(i: int) -> float:
    return -1.0 - 0.5 * i


def script_from_ids(
    ids: list[int], req: GenerateRequest, vocab: int, eos: int | None
) -> list[TokenEvent]:
    """Events for `ids` (+ EOS), cut at max_tokens, with logprobs as requested."""
    p = req.params
    seq = ids + ([eos] if eos is not None else [])
    seq = seq[: p.max_tokens]
    events = []
    for i, tid in enumerate(seq):
        lp = token_logprob(i)
        top = top_list(tid, lp, p.logprobs, vocab) if p.logprobs is not None else None
        events.append(TokenEvent(tid, lp if p.logprobs is not None else None, top))
    last = events[-1]
    last.finish_reason = "stop" if last.token_id == eos else "length"
    first = events[0]
    first.num_cached_tokens = min(CACHED_TOKENS, len(req.token_ids))
    if p.prompt_logprobs is not None:
        k = p.prompt_logprobs
        first.prompt_logprobs = [None] + [
            (prompt_logprob(i), top_list(t, prompt_logprob(i), k, vocab))
            for i, t in enumerate(req.token_ids[1:], start=1)
        ]
    return events


@dataclass
class FakeBackend:
    tokenizer: PreTrainedTokenizerBase
    eos: int | None = 2
    script: Script | None = None
    delay_s: float = 0.0  # between events
    fail_before: BackendError | None = None  # raised by generate() before any event
    fail_after: int | None = None  # events played before BackendUnavailable mid-stream
    requests: list[GenerateRequest] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)  # request ids per generate_group
    played: dict[str, int] = field(default_factory=dict)  # request id -> events yielded
    closed: list[str] = field(default_factory=list)  # request ids whose iterator was closed
    finished: list[str] = field(default_factory=list)  # request ids played to the end
    active: set[str] = field(default_factory=set)  # request ids being played now
    peak_active: int = 0  # the most requests played at once
    started: bool = False
    stopped: bool = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.stopped = True

    async def ready(self) -> bool:
        return True

    async def workers(self) -> list[dict[str, Any]]:
        return []

    def default_script(self, req: GenerateRequest) -> list[TokenEvent]:
        ids = reply_ids(self.tokenizer, req.params.seed)
        return script_from_ids(ids, req, len(self.tokenizer), self.eos)

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        # As the engine does ("duplicate seq_id"): two live requests never share an id.
        assert req.request_id not in self.active, f"duplicate request id {req.request_id}"
        self.requests.append(req)
        self.active.add(req.request_id)
        self.peak_active = max(self.peak_active, len(self.active))
        return self._play(req)

    def generate_group(self, reqs) -> list[AsyncIterator[TokenEvent]]:
        self.groups.append([r.request_id for r in reqs])
        return [self.generate(r) for r in reqs]

    async def _play(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        rid = req.request_id
        try:
            if self.fail_before is not None:
                raise self.fail_before
            events = (self.script or self.default_script)(req)
            for i, ev in enumerate(events):
                if self.fail_after is not None and i == self.fail_after:
                    raise BackendUnavailable("decode worker lost")
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                self.played[rid] = i + 1
                yield ev
            self.finished.append(rid)
        finally:
            self.closed.append(rid)
            self.active.discard(rid)
