"""Structured output: a Guide compiled into an llguidance matcher, and each step's token masks.

llguidance, not a hand-written state machine: it is one 3 MB wheel without dependencies (xgrammar
pulls CUDA packages into a fresh install), covers JSON Schema, regular expressions and Lark, and
names the schema keyword it does not implement. Measured with SmolLM2's 49,152-token vocabulary
(2-vCPU Xeon, docs/BENCHMARKS.md): building the token trie 0.34 s once per tokenizer, compiling a
small schema ~0.5 ms, a mask ~10-15 us median and ~65 us mean per token in JSON (up to
~0.5 ms where a string may start).

A repeated guide is compiled once: `Grammars` keeps the pristine matcher of each, keyed by a
digest of (kind, spec), and hands every sequence a deep copy advanced over the tokens it has
generated so far. That is also how a sequence resumed elsewhere (the decode worker after a
prefill, a failover) continues from the grammar state its tokens reached.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance.hf
import numpy as np
from llguidance import LLMatcher, LLTokenizer

from engine.sampling_params import Guide

# No free whitespace in JSON, and json.dumps' separators: a small model offered free
# whitespace can emit newlines until max_tokens (a known failure of grammar-constrained JSON).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256  # compiled grammars kept per tokenizer (a few hundred KB each at most)


class GuideError(ValueError):
    """A guide that does not compile, or tokens it does not accept. The message is
    llguidance's, which names an unsupported keyword (`Unimplemented keys: ["not"]`)."""


@dataclass(slots=True)
class GrammarStats:
    compiles: int = 0  # cache misses
    hits: int = 0
    compile_seconds: float = 0.0


def grammar_text(guide: Guide) -> str:
    """The llguidance grammar of a guide (not yet checked)."""
    try:
        if guide.kind == "json":
            schema = json.loads(guide.spec)
            if not isinstance(schema, dict):
                raise ValueError("a JSON Schema must be a JSON object")
            return LLMatcher.grammar_from_json_schema(closed(schema), defaults=JSON_OPTIONS)
        if guide.kind == "regex":
            return LLMatcher.grammar_from_regex(guide.spec)
        return LLMatcher.grammar_from_lark(guide.spec)
    except (ValueError, RecursionError) as exc:  # not a JSON object, or nested too deep
        raise GuideError(str(exc) or "the schema is nested too deeply") from None


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
            "unevaluatedProperties", "propertyNames")


def closed(schema: Any) -> Any:
    """`schema` with every object that lists `properties` closed to others unless it says
    otherwise: what vLLM's default backend does (xgrammar's strict mode). JSON Schema allows
    unlisted properties by default, and a small model given them goes on inventing keys until
    max_tokens (measured: LangChain's function-calling schema for a two-field model, SmolLM2,
    greedy). Walks schema positions only, so a property named "properties" is not mistaken for
    the keyword."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    for key in _SCHEMAS:
        if key in out:
            out[key] = closed(out[key])
    if "properties" in out and not {"additionalProperties", "patternProperties",
                                    "unevaluatedProperties"} & out.keys():
        out["additionalProperties"] = False
    return out


class Grammars:
    """Compiled guides for one tokenizer. Thread-safe: a router compiles on worker threads."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int],
                 capacity: int = CACHE_SIZE):
        self.vocab_size = vocab_size
        self._hf = tokenizer
        self._eos = sorted(eos_ids)
        self._llt: LLTokenizer | None = None
        self._cache: OrderedDict[bytes, LLMatcher] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()
        self.stats = GrammarStats()

    def warm(self) -> None:
        """Build the token trie now rather than on the first guide."""
        self._tokenizer()

    def _tokenizer(self) -> LLTokenizer:
        with self._lock:  # built on first use: 0.34 s that a server without guides never pays
            if self._llt is None:
                self._llt = llguidance.hf.from_tokenizer(
                    self._hf, n_vocab=self.vocab_size, eos_token=self._eos or None)
            return self._llt

    def compile(self, guide: Guide) -> LLMatcher:
        """The pristine matcher of `guide` (do not advance it: see matcher())."""
        key = hashlib.blake2b(f"{guide.kind}\0{guide.spec}".encode(), digest_size=16).digest()
        with self._lock:
            if (hit := self._cache.get(key)) is not None:
                self._cache.move_to_end(key)
                self.stats.hits += 1
                return hit
        start = time.perf_counter()
        # llguidance drops the GIL while it builds; two threads may build one guide at once.
        built = LLMatcher(self._tokenizer(), grammar_text(guide), log_level=0)
        if built.is_error():
            raise GuideError(built.get_error())
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += time.perf_counter() - start
            self._cache[key] = built
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return built

    def matcher(self, guide: Guide, generated: list[int]) -> LLMatcher:
        """A matcher of its own for one sequence, advanced over the tokens generated so far."""
        m = self.compile(guide).deep_copy()
        if generated and not m.consume_tokens(generated):
            raise GuideError("the tokens generated so far do not match the guide: "
                             + m.get_error())
        return m


def token_mask(m: LLMatcher, vocab_size: int) -> np.ndarray:
    """The matcher's next-token mask as logit offsets: float32 [vocab_size], 0 where a token is
    allowed and -inf where not (an add is ~5x cheaper than a masked fill per row on CPU).
    Raises GuideError when it allows nothing (it is in an error state)."""
    words = (vocab_size + 31) // 32
    bits = np.zeros(words, dtype=np.int32)  # bit t (little-endian): token t allowed
    m.unsafe_compute_mask_ptr(bits.ctypes.data, words * 4)
    if m.is_error():
        raise GuideError(m.get_error())
    allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab_size]
    with np.errstate(divide="ignore"):  # log(1) = 0, log(0) = -inf: 40 us, a lookup 130 us
        return np.log(allowed, dtype=np.float32)
