"""The engine's intake: checking a SeqRequest, and trimming its imported prefix KV to the tokens
the sequence will use.

Every rule a request must meet lives here (`check_request`), so the engine and a worker answering
before it streams (worker/sequence.py) refuse exactly the same requests; nothing the engine
accepts can make a step fail for a whole batch.

A prefix arrives as whole blocks [n, L, 2, H, B, D] or a list of n blocks [L, 2, H, B, D] (from
the KV store), optionally followed by a partial tail [L, 2, H, t, D] (t < B), or as one
concatenated [L, 2, H, T, D] tensor.
"""

from __future__ import annotations

import math

import torch

from engine.kv_layout import KVLayout
from engine.sampling_params import SamplingParams
from engine.sequence import SeqRequest

MAX_LOGPROBS = 20  # OpenAI's top_logprobs cap (and vLLM's default max_logprobs)
MAX_LOGIT_BIAS = 1024  # ids per request: bounds the per-step indexing and the body size
MAX_STOP_TOKEN_IDS = 1024  # the router's own cap (router/protocol/common.py)
MAX_BIAS = 100.0  # OpenAI: logit_bias values in [-100, 100]
MAX_PENALTY = 2.0  # OpenAI: presence/frequency penalties in [-2, 2]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class InvalidRequest(ValueError):
    """A request the engine refuses. `param` names the offending field (OpenAI's error param);
    `code` is OpenAI's error code where it has one."""

    def __init__(self, param: str, message: str, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def _require(ok: bool, param: str, message: str, code: str | None = None) -> None:
    if not ok:
        raise InvalidRequest(param, message, code)


def _finite_in(x: float, lo: float, hi: float) -> bool:
    return math.isfinite(x) and lo <= x <= hi


def check_request(req: SeqRequest, lay: KVLayout, vocab: int, max_model_len: int) -> None:
    """Raise InvalidRequest (a ValueError) on a request the engine cannot run."""
    n = len(req.token_ids)
    _require(n > 0, "token_ids", "token_ids must not be empty")
    _require(1 <= req.num_prompt_tokens <= n, "num_prompt_tokens",
             f"num_prompt_tokens {req.num_prompt_tokens} not in [1, {n}]")
    _require(n < max_model_len, "token_ids",
             f"{n} tokens leave no room under max_model_len {max_model_len}",
             "context_length_exceeded")
    _require(min(req.token_ids) >= 0 and max(req.token_ids) < vocab, "token_ids",
             f"token id out of range [0, {vocab})")
    check_params(req.params, vocab)
    if req.prefix_kv is not None and req.prefix_len > 0:
        _require(req.prefix_start % lay.block_size == 0 and 0 <= req.prefix_start < req.prefix_len,
                 "prefix_start", f"prefix_start {req.prefix_start} is not a whole number of "
                 f"blocks below prefix_len {req.prefix_len}")
        check_prefix(req.prefix_kv, req.prefix_tail, req.prefix_len - req.prefix_start,
                     n - req.prefix_start, lay)


def check_params(p: SamplingParams, vocab: int) -> None:
    """Raise InvalidRequest unless every sampling control is in the range sampling handles."""
    _require(p.max_tokens >= 1, "max_tokens", f"max_tokens must be >= 1, got {p.max_tokens}")
    _require(0 <= p.min_tokens <= p.max_tokens, "min_tokens",
             f"min_tokens {p.min_tokens} not in [0, max_tokens = {p.max_tokens}]")
    _require(_finite_in(p.temperature, 0.0, math.inf), "temperature",
             f"temperature must be finite and >= 0, got {p.temperature}")
    _require(_finite_in(p.top_p, 0.0, 1.0) and p.top_p > 0, "top_p",
             f"top_p must be in (0, 1], got {p.top_p}")
    _require(-1 <= p.top_k <= vocab, "top_k",
             f"top_k must be -1, 0 (off) or in [1, {vocab}], got {p.top_k}")
    _require(_finite_in(p.min_p, 0.0, 1.0), "min_p", f"min_p must be in [0, 1], got {p.min_p}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        _require(_finite_in(value, -MAX_PENALTY, MAX_PENALTY), name,
                 f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
    _require(_finite_in(p.repetition_penalty, 0.0, math.inf) and p.repetition_penalty > 0,
             "repetition_penalty",
             f"repetition_penalty must be finite and > 0, got {p.repetition_penalty}")
    _check_ids(p.logit_bias, vocab, MAX_LOGIT_BIAS, "logit_bias")
    _require(all(_finite_in(v, -MAX_BIAS, MAX_BIAS) for v in p.logit_bias.values()),
             "logit_bias", f"logit_bias values must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}]")
    _check_ids(p.stop_token_ids, vocab, MAX_STOP_TOKEN_IDS, "stop_token_ids")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(p, name)
        _require(value is None or 0 <= value <= MAX_LOGPROBS, name,
                 f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
    _require(p.seed is None or INT64_MIN <= p.seed <= INT64_MAX, "seed",
             f"seed must fit in int64, got {p.seed}")


def _check_ids(ids, vocab: int, limit: int, param: str) -> None:
    """ids: a list of token ids, or a dict keyed by them."""
    _require(len(ids) <= limit, param, f"{param} holds {len(ids)} token ids; at most {limit}")
    _require(all(0 <= i < vocab for i in ids), param,
             f"{param} token ids must be in [0, {vocab})")


def _flat_ok(x: torch.Tensor, lay: KVLayout) -> bool:
    return x.ndim == 5 and (x.shape[0], x.shape[1], x.shape[2], x.shape[4]) == (
        lay.num_layers, 2, lay.num_kv_heads, lay.row)


def check_prefix(
    prefix: torch.Tensor | list[torch.Tensor], tail: torch.Tensor | None, prefix_len: int,
    num_tokens: int, lay: KVLayout,
) -> None:
    """Raise ValueError unless prefix (+ tail) is shaped and typed for `lay` and covers
    prefix_len (a float block written into an int8 pool would be cast, not refused)."""
    parts = [*(prefix if isinstance(prefix, list) else [prefix]), *([tail] if tail is not None
                                                                    else [])]
    if any(p.dtype != lay.store_dtype for p in parts):
        raise ValueError(f"prefix KV must be {lay.store_dtype} (the pool's, {lay.name})")
    if isinstance(prefix, list):
        if any(tuple(b.shape) != lay.block_shape for b in prefix):
            raise ValueError(f"a prefix block does not match {lay.block_shape}")
        covered = len(prefix) * lay.block_size
    elif prefix.ndim == 6:
        if tuple(prefix.shape[1:]) != lay.block_shape:
            raise ValueError(f"prefix blocks {tuple(prefix.shape)} do not match {lay.block_shape}")
        covered = prefix.shape[0] * lay.block_size
    elif _flat_ok(prefix, lay):
        covered = prefix.shape[3]
    else:
        raise ValueError(f"prefix_kv shape {tuple(prefix.shape)} does not match the KV layout")
    if tail is not None:
        if not _flat_ok(tail, lay):
            raise ValueError(f"prefix_tail shape {tuple(tail.shape)} does not match the KV layout")
        covered += tail.shape[3]
    if not 0 < prefix_len <= min(covered, num_tokens):
        raise ValueError(f"prefix_len {prefix_len} not in [1, {min(covered, num_tokens)}]")


def trim_prefix(
    prefix: torch.Tensor | list[torch.Tensor], tail: torch.Tensor | None, length: int,
    lay: KVLayout,
) -> tuple[torch.Tensor | list[torch.Tensor] | None, torch.Tensor | None]:
    """(blocks, flat) views covering at least tokens [0, length): the blocks first, then flat."""
    if not isinstance(prefix, list) and prefix.ndim == 5:
        flat = prefix if tail is None else torch.cat([prefix, tail.to(prefix.device)], dim=3)
        return None, flat[:, :, :, :length]
    B = lay.block_size
    n = min(len(prefix), -(-length // B))  # whole blocks, the last may pass `length`
    rest = length - n * B
    flat = tail[:, :, :, :rest] if rest > 0 and tail is not None else None
    return prefix[:n], flat
