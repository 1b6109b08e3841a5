"""KV-aware routing: a request goes to the worker that holds most of its prefix on its device,
unless load says otherwise (Dynamo's KV router and SGLang's cache-aware router do the same).

Each worker publishes the page digests it holds (engine/resident_filter.py, GET /kv_summary;
the pool fetches a summary only when /health shows a new version). For a request, the router
chains the same page digests over its token ids (engine/page_hash.py: the worker's fingerprint,
KV format and page size, and the request's cache salt, so tenants never match each other's
pages) and counts, per candidate, the leading pages its filter holds:

    cost(w) = tokens to compute on w + load_tokens x requests in flight on w
            = (prompt - matched(w)) + load_tokens x inflight(w)

The cheapest wins, ties to the less loaded. `load_tokens` prices one request in flight in
prompt tokens to compute: a request already there shares every engine step with ours, adding
its own uncached prompt (a warm turn's new question: tens of tokens) and one token per step of
decode. 64 by default; 256 made a worker holding a 500-token conversation lose it to an idle
one at 2 requests in flight, which copied the conversation onto every worker and evicted it
from all of them (docs/BENCHMARKS.md, "KV-aware routing"). When the candidates' loads are
skewed (max - min in flight above `balance_abs`) cost is ignored and the least loaded wins:
a hot prefix must not pile every request onto one worker.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from engine.page_hash import chain_root, extend_chain
from engine.resident_filter import HASHES, contains
from wire.internal_api import KVSummary

if TYPE_CHECKING:
    from router.dispatch.worker_info import WorkerInfo

POLICIES = ("kv", "least_loaded")


@dataclass(slots=True)
class ResidentView:
    """A worker's published filter, as the router keeps it."""

    version: int
    page_size: int
    bits: int
    packed: np.ndarray  # uint8 [bits / 8]

    @classmethod
    def from_summary(cls, s: KVSummary) -> ResidentView:
        """Checked: a summary whose size does not match its bits is refused (ValueError)."""
        packed = np.frombuffer(base64.b64decode(s.packed, validate=True), dtype=np.uint8)
        if (s.bits <= 0 or s.bits & (s.bits - 1) or packed.size * 8 != s.bits
                or s.hashes != HASHES or s.page_size <= 0):
            raise ValueError(f"malformed kv summary ({s.bits} bits, {packed.size} bytes)")
        return cls(s.version, s.page_size, s.bits, packed)

    def matched_pages(self, digests: list[bytes]) -> int:
        """Leading digests the filter holds (the engine matches a prefix the same way)."""
        n = 0
        for d in digests:
            if not contains(self.packed, self.bits, d):
                break
            n += 1
        return n


@dataclass(slots=True)
class RoutePrefix:
    """One request's prompt, as routing sees it: its page digests, chained once per namespace
    (fingerprint, KV format, page size) and reused for every candidate and retry."""

    token_ids: list[int]
    cache_salt: str
    _digests: dict[tuple, list[bytes]] = field(default_factory=dict)

    def digests(self, fingerprint: str, kv_format: str, page_size: int) -> list[bytes]:
        key = (fingerprint, kv_format, page_size)
        if key not in self._digests:
            root = chain_root(fingerprint, kv_format, page_size, self.cache_salt)
            # The engine always leaves one prompt token to feed: pages of the rest can match.
            full = (len(self.token_ids) - 1) // page_size
            out: list[bytes] = []
            extend_chain(out, root, self.token_ids, page_size, full)
            self._digests[key] = out
        return self._digests[key]


@dataclass(slots=True)
class RouteStats:
    """What the router chose, for /metrics: decisions by reason, and prompt tokens matched."""

    decisions: dict[tuple[str, str], int] = field(default_factory=dict)  # (role, reason) -> n
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # role -> routed prompt tokens
    matched_tokens: dict[str, int] = field(default_factory=dict)  # role -> on the chosen worker

    def record(self, role: str, reason: str, prompt: int, matched: int) -> None:
        self.decisions[(role, reason)] = self.decisions.get((role, reason), 0) + 1
        self.prompt_tokens[role] = self.prompt_tokens.get(role, 0) + prompt
        self.matched_tokens[role] = self.matched_tokens.get(role, 0) + matched


@dataclass(slots=True)
class KVRouter:
    policy: str = "kv"
    load_tokens: int = 64
    balance_abs: int = 8
    stats: RouteStats = field(default_factory=RouteStats)

    def choose(self, candidates: list[WorkerInfo], prefix: RoutePrefix | None,
               load: Callable[[WorkerInfo], tuple]) -> WorkerInfo:
        """One of `candidates` (non-empty); `load` orders them for least-loaded."""
        least = min(candidates, key=load)
        if self.policy != "kv" or prefix is None:
            return least
        role, prompt = least.role, len(prefix.token_ids)
        matched = {id(w): self._matched(w, prefix) for w in candidates}
        inflight = [w.inflight for w in candidates]
        if max(inflight) - min(inflight) > self.balance_abs:
            self.stats.record(role, "balance", prompt, matched[id(least)])
            return least
        best = min(candidates, key=lambda w: (
            prompt - matched[id(w)] + self.load_tokens * w.inflight, load(w)))
        reason = "prefix" if matched[id(best)] > 0 else "load"
        self.stats.record(role, reason, prompt, matched[id(best)])
        return best

    @staticmethod
    def _matched(w: WorkerInfo, prefix: RoutePrefix) -> int:
        view, h = w.resident, w.health
        if view is None or h is None:
            return 0
        digests = prefix.digests(h.fingerprint, h.dtype, view.page_size)
        return view.matched_pages(digests) * view.page_size
