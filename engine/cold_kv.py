"""Cold KV: the middle of a long sequence's keys and values, kept outside the page pool.

A sequence may hold at most `window` pages in the pool. Past that, the oldest pages after its
first few ("sink" pages) go cold: their K/V move to a cold tier (the worker's CPU memory tier,
spilling to disk: worker/cold_tier.py) and the pages are freed.

    tokens      |  sink  |        cold span         |   recent (resident)   |
                [0, sink) [sink, sink + span.tokens)  [sink + span.tokens, kv_len)
    seq.pages   [s0 s1 ..]                            [r0 r1 ...]   table position =
                                                                     token - span.tokens

Attention is a sum over keys, so it does not care where a key sits: a step attends over the
resident pages as if they were the whole sequence (table positions) and over the cold span a
segment at a time, and the parts are merged exactly by log-sum-exp (engine/split_attention.py).
RoPE was applied to the keys before they were stored, so moving them changes nothing.

The cold span is stored as segments of at most `segment` tokens (SEGMENT_TOKENS, or a quarter
of the pool where that is less), one tensor per layer
[2, t, H, D] (token-major, like a page) under `<segment key>/<layer>`, so a step streams one
layer's segment at a time (engine/cold_stream.py). Pages go cold `evict_unit` at a time, appended
to the last segment while it has room (rewritten under a new key) or starting a new one.
Segments are immutable and refcounted: a fork shares its parent's span.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.page_pool import PagePool

# Tokens per cold segment: a step makes one attention call per segment and layer (~40 us of
# fixed cost on CPU), so segments are long; a stream holds 3 at a time (engine/cold_stream.py),
# 1.6 MB each for SmolLM2 in fp32, which the KV budget reserves.
SEGMENT_TOKENS = 1024
SINK_PAGES = 4  # the first 64 tokens stay resident (attention sinks)


class ColdTier(Protocol):
    """Where cold segments live. `get` answers None for a key it no longer has."""

    def put(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def get(self, keys: list[str]) -> list[torch.Tensor | None]: ...

    def delete(self, keys: list[str]) -> None: ...


class HostColdTier:
    """A dict of tensors: the engine's own cold tier when it runs without a worker's store."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors.update(tensors)

    def get(self, keys: list[str]) -> list[torch.Tensor | None]:
        return [self.tensors.get(k) for k in keys]

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            self.tensors.pop(k, None)


class ColdKVLost(RuntimeError):
    """A cold segment is gone from its tier (evicted, a disk fault): the sequence recomputes."""

    def __init__(self, key: str):
        super().__init__(f"cold KV segment {key} is missing from the cold tier")
        self.key = key


@dataclass(slots=True)
class Segment:
    key: str  # layer l's [2, tokens, H, D] is under f"{key}/{l}"
    tokens: int


@dataclass(slots=True)
class ColdSpan:
    """Tokens [sink, sink + tokens) of a sequence, out of its page table."""

    sink: int  # tokens before the span (its first sink pages, resident)
    segments: list[Segment] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.segments)


def layer_keys(key: str, layers: int) -> list[str]:
    """The keys of a segment's per-layer tensors."""
    return [f"{key}/{layer}" for layer in range(layers)]


def segment_of(layer_key: str) -> str:
    return layer_key.rsplit("/", 1)[0]


def table_len(seq) -> int:
    """seq's resident token count as its page table sees it (kv_len less the cold span)."""
    return seq.kv_len - (seq.cold.tokens if seq.cold is not None else 0)


class ColdKV:
    """Moves pages of long sequences to a cold tier and back out for export.

    window: pages one sequence may hold in the pool before its older pages go cold."""

    def __init__(self, tier: ColdTier, pool: PagePool, window: int, prefetch: bool = True,
                 segment: int = SEGMENT_TOKENS):
        if window < 4:
            raise ValueError(f"a KV window of {window} pages is too small (at least 4)")
        self.tier = tier
        self.pool = pool
        self.window = window
        self.prefetch = prefetch
        self.segment = segment  # tokens per segment at most
        self.sink_pages = min(SINK_PAGES, window // 4)
        # Pages that go cold together: a quarter of the non-sink window, so a decoding sequence
        # rewrites its last segment once per evict_unit tokens, not once per page.
        self.evict_unit = max(1, (window - self.sink_pages) // 4)
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:12]  # keys unique to this engine
        self._refs: dict[str, int] = {}
        self.tokens_out = 0  # tokens moved to the cold tier (counter)

    # --- the window ------------------------------------------------------------------------

    def fit(self, seq, want: int) -> int:
        """Make room in seq's window for `want` more tokens by sending its oldest recent pages
        cold. Returns how many of them fit (<= want; >= 1 unless seq is mid-page of a tiny
        window). Only full pages before the one being written can go."""
        P = self.pool.page_size
        over = -(-(table_len(seq) + want) // P) - self.window
        if over > 0:
            self.shrink(seq, max(over, self.evict_unit))
        return max(0, min(want, self.window * P - table_len(seq)))

    def movable(self, seq) -> int:
        """seq's pages that can go cold: its full pages after the sink (the one being written
        and the sink stay)."""
        return max(0, table_len(seq) // self.pool.page_size - self._sink(seq))

    def shrink(self, seq, pages: int) -> None:
        """Send up to `pages` of seq's oldest movable pages cold."""
        n = min(pages, self.movable(seq))
        if n > 0:
            self._evict(seq, self._sink(seq), n)

    def _sink(self, seq) -> int:
        return self.sink_pages if seq.cold is None else seq.cold.sink // self.pool.page_size

    def _evict(self, seq, sink: int, n: int) -> None:
        """Send pages [sink, sink + n) of seq's table cold."""
        pages = seq.pages[sink : sink + n]
        idx = torch.tensor(pages, device=self.pool.kv.device)
        L, _, _, P, H, D = self.pool.kv.shape
        kv = self.pool.kv[:, :, idx].reshape(L, 2, n * P, H, D)  # a copy: index by tensor
        if seq.cold is None:
            seq.cold = ColdSpan(sink * P)
        self.append(seq.cold, kv)
        seq.pages = seq.pages[:sink] + seq.pages[sink + n :]
        self.pool.release(pages)

    def append(self, span: ColdSpan, kv: torch.Tensor) -> None:
        """Append kv [L, 2, t, H, D] (tokens right after the span) to the span."""
        t = kv.shape[2]
        self.tokens_out += t
        last = span.segments[-1] if span.segments else None
        if last is not None and self._refs[last.key] == 1 and last.tokens + t <= self.segment:
            old = self._get(layer_keys(last.key, kv.shape[0]))
            kv = torch.cat([torch.stack(old), kv.to(old[0].device)], dim=2)
            span.segments.pop()
            self._drop(last.key, kv.shape[0])
        for at in range(0, kv.shape[2], self.segment):
            part = kv[:, :, at : at + self.segment]
            key = f"cold/{self._prefix}/{next(self._ids)}"
            names = layer_keys(key, part.shape[0])
            self.tier.put({name: part[i].contiguous() for i, name in enumerate(names)})
            self._refs[key] = 1
            span.segments.append(Segment(key, part.shape[2]))

    # --- reading ---------------------------------------------------------------------------

    def _get(self, keys: list[str]) -> list[torch.Tensor]:
        got = self.tier.get(keys)
        for key, t in zip(keys, got, strict=True):
            if t is None:
                raise ColdKVLost(key)
        return got

    def read(self, span: ColdSpan, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) of the span (token positions) as [L, 2, H, end - start, D]."""
        L = self.pool.kv.shape[0]
        parts, at = [], span.sink
        for seg in span.segments:
            lo, hi = max(start, at), min(end, at + seg.tokens)
            if lo < hi:
                layers = self._get(layer_keys(seg.key, L))
                parts.append(torch.stack([x[:, lo - at : hi - at] for x in layers]))
            at += seg.tokens
        return torch.cat(parts, dim=2).permute(0, 1, 3, 2, 4).to(self.pool.kv.device)

    # --- ownership -------------------------------------------------------------------------

    def share(self, span: ColdSpan) -> ColdSpan:
        """A copy of span for a fork, holding its own references to the same segments."""
        for seg in span.segments:
            self._refs[seg.key] += 1
        return ColdSpan(span.sink, list(span.segments))

    def release(self, span: ColdSpan | None) -> None:
        if span is None:
            return
        for seg in span.segments:
            self._drop(seg.key, self.pool.kv.shape[0])
        span.segments = []

    def _drop(self, key: str, layers: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.tier.delete(layer_keys(key, layers))


def segment_tokens(pool_tokens: int, layers: int, held: int) -> int:
    """Tokens per cold segment: SEGMENT_TOKENS, unless the `held` segments a stream holds (one
    layer's each, so 1/layers of a pool token's bytes per token) would take more than a quarter
    of a pool of `pool_tokens`. Measured at 1/16 of SmolLM2's 8k context, fp32 (a 488-token
    pool): segments of a quarter of the pool (122 tokens, 64 calls per layer) decoded 3.4x
    slower than all-resident; segments of 1024 cost the pool 34 tokens per segment held."""
    return max(1, min(SEGMENT_TOKENS, pool_tokens * layers // (4 * held)))
