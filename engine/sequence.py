"""What goes into the engine (SeqRequest), what comes out (TokenEvent), and a sequence's state.

A sequence's state is counters, not modes:

    token_ids  |p0 p1 p2 p3 p4 p5 g0 g1|     prompt (num_prompt_tokens), then generated
    kv         |<--- kv_len --->|            tokens whose K/V sit in its pages
                                 ^^^^^^^^    to feed: token_ids[kv_len:]

Each step feeds `token_ids[kv_len:]` (prefill chunks while more than one token is left, then one
decode token per step) and samples from the last position's logits. A fresh prompt, a prompt
with a cached prefix, a prefill-worker handoff (prompt KV + first token) and a failover resume
are all the same case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.cold_kv import ColdSpan
from engine.sampler import SampleRow
from engine.sampling_params import SamplingParams

PromptLogprob = tuple[float, list[tuple[int, float]]]  # (logprob of the token, raw top-k)


@dataclass(slots=True)
class SeqRequest:
    """A sequence to run. `prefix_kv` covers token_ids[prefix_start:prefix_len], as blocks
    [n, L, 2, H, B, D], a list of n blocks [L, 2, H, B, D] (as the store returns them: no
    concatenation), or concatenated [L, 2, H, T, D]; `prefix_tail` [L, 2, H, t, D] (t < B)
    optionally follows the blocks. Both may sit on any device; they are copied in at admission
    and only read, so they may be views of a store's buffers.

    `prefix_start` > 0 (whole blocks) says the engine's own pool held tokens [0, prefix_start)
    when the caller looked (Engine.cached_prefix_tokens), so the store was not asked for them.
    Should they be evicted before admission, the import is dropped and recomputed.
    """

    seq_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    prefix_kv: torch.Tensor | list[torch.Tensor] | None = None
    prefix_len: int = 0
    prefill_only: bool = False  # stop after one token; keep the KV until release()
    prefix_tail: torch.Tensor | None = None
    prefix_start: int = 0
    # Tenancy tag: resident KV is reused only between sequences with the same tag.
    cache_salt: str = ""


@dataclass(slots=True)
class TokenEvent:
    """One generated token: what the engine emits, what workers send the router (one NDJSON
    line each, see wire/internal_api.py) and what the router's Backend yields. One type from
    the engine to the API layer; `seq_id` routes it inside a worker and is not sent."""

    token_id: int
    logprob: float | None = None  # raw logprob of token_id, when params.logprobs is set
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first
    finish_reason: str | None = None  # None, "stop" or "length"
    # First event only: leading tokens whose KV was reused (store import or resident), not fed.
    num_cached_tokens: int | None = None
    # First event only, when params.prompt_logprobs is set: one entry per prompt token, the
    # first None (nothing predicts it).
    prompt_logprobs: list[PromptLogprob | None] | None = None
    seq_id: str = ""  # the engine sequence it belongs to


@dataclass(slots=True, eq=False)  # identity equality: deque.remove must not compare tensors
class Sequence:
    seq_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    stop_ids: frozenset[int]  # EOS (unless ignore_eos) + stop_token_ids
    prefill_only: bool = False
    cache_salt: str = ""
    kv_len: int = 0
    reused: int | None = None  # kv_len at admission, until the first event reports it
    placed: bool = False  # its KV is in the page pool (False: waiting, or preempted)
    pages: list[int] = field(default_factory=list)  # page table: page i = tokens [i*P, (i+1)*P)
    committed: int = 0  # leading pages registered in the prefix cache
    cold: ColdSpan | None = None  # tokens of its KV moved out of the pool (engine/cold_kv.py)
    root: bytes | None = None  # page digest chain root (tenant-scoped), set on first use
    digests: list[bytes] = field(default_factory=list)  # chained digests of its full pages
    # K/V held outside the pool: a store import of tokens [held_start, kv_len) waiting for
    # admission.
    held_start: int = 0
    held_blocks: torch.Tensor | list[torch.Tensor] | None = None  # n blocks: tokens [0, n * B)
    held_flat: torch.Tensor | None = None  # [L, 2, H, t, D], the tokens right after the blocks
    finish_reason: str | None = None
    done: bool = False  # emitted its last event (finished, or a prefill_only's one token)
    sampled: bool = False  # has sampled in this engine (fork semantics)
    forks: list[tuple[str, SamplingParams]] = field(default_factory=list)  # pending children
    prompt_lps: list[PromptLogprob | None] | None = None  # being collected during prefill
    # Its guide's llguidance.LLMatcher (structured output), advanced over its generated tokens.
    matcher: Any = None

    @property
    def todo(self) -> int:
        """Tokens still to feed. 1 means the next decode step feeds the last one."""
        return len(self.token_ids) - self.kv_len

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_decoder(self) -> bool:
        return self.placed and not self.done and self.todo == 1

    def sample_row(self, guide_mask: torch.Tensor | None = None) -> SampleRow:
        """`guide_mask` [V]: its guide's mask for this token (0 / -inf), when it has one."""
        p = self.params
        banned = tuple(self.stop_ids) if self.num_generated < p.min_tokens else ()
        return SampleRow(p, len(self.token_ids), self.token_ids, self.num_prompt_tokens, banned,
                         guide_mask)

    def append(self, token_id: int, max_model_len: int) -> str | None:
        """Take a sampled token: "stop", "length" or None (keep going). A guide that can take
        no further token ends the sequence as a stop, without waiting for an EOS."""
        self.token_ids.append(token_id)
        self.sampled = True
        if token_id in self.stop_ids:
            return "stop"
        if self.matcher is not None:
            # The mask let through only tokens the matcher accepts; one it refused anyway
            # leaves it in an error state, which the next mask reports (the sequence fails).
            self.matcher.consume_token(token_id)
            if self.matcher.is_stopped():
                return "stop"
        if self.num_generated >= self.params.max_tokens or len(self.token_ids) >= max_model_len:
            return "length"
        return None


def stop_ids_for(params: SamplingParams, eos_ids: frozenset[int]) -> frozenset[int]:
    ids = frozenset(params.stop_token_ids)
    return ids if params.ignore_eos else ids | eos_ids
