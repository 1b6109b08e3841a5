"""Wire models of the internal worker APIs (JSON / NDJSON over HTTP). Token ids only; KV
tensors travel through the store, never over these calls.

A worker checks every field before it answers 200 (the engine's own checks, engine/intake.py):
a request it refuses gets a 400 in OpenAI's error envelope
`{"error": {"message", "type": "invalid_request_error", "param", "code"}}`, as does a body these
models reject; 401 a missing or wrong `X-Tandem-Token`, 429 full, 503 draining.
"""

from __future__ import annotations

from pydantic import BaseModel, TypeAdapter

from engine.sampling_params import SamplingParams
from engine.sequence import TokenEvent

INTERNAL_TOKEN_HEADER = "X-Tandem-Token"

# The token event is the engine's own dataclass; pydantic reads and writes it as is, so the
# engine, the workers' NDJSON lines and the router's Backend share one type.
_EVENT = TypeAdapter(TokenEvent)


def event_line(ev: TokenEvent) -> str:
    """One NDJSON line: the event's set fields, without the worker-local seq_id."""
    return _EVENT.dump_json(ev, exclude={"seq_id"}, exclude_none=True).decode() + "\n"


def parse_event(line: str | bytes) -> TokenEvent:
    """Raises pydantic.ValidationError (a ValueError) on a malformed line."""
    return _EVENT.validate_json(line)


class SequenceRequest(BaseModel):
    """What both worker calls carry. `params` travels as the engine's own SamplingParams."""

    request_id: str
    token_ids: list[int]  # prefill: the prompt; decode: prompt + every token generated so far
    params: SamplingParams
    cache_salt: str = ""


class PrefillRequest(SequenceRequest):
    pass


class PrefillResponse(BaseModel):
    """The first line of /prefill's NDJSON body, sent as soon as the first token is sampled;
    a `PrefillCommitted` line follows once the prompt's KV is in the store."""

    event: TokenEvent  # the first generated token; num_cached_tokens: prompt tokens reused
    # Key of the prompt's partial last block: kvstore.keys.KeyChain.tail_key, derived from the
    # namespace, the request id and the tail's tokens (chained from the blocks before it).
    tail_key: str | None = None
    tail_start: int = 0  # token position where the tail begins


class PrefillCommitted(BaseModel):
    """The last line of /prefill's body: the blocks and tail are stored, decode may load them."""

    committed: bool = True
    stored_bytes: int = 0


class DecodeRequest(SequenceRequest):
    num_prompt_tokens: int
    # The prefill reply's tail key and start, passed on once it committed: a claim that the
    # tail is stored. The decode worker recomputes the key from its own tokens (tokens
    # [tail_start, num_prompt_tokens)) and loads the tail only when both match, so a caller can
    # never make it read (or delete, when it does not decode) any other key.
    tail_key: str | None = None
    tail_start: int = 0


class WorkerHealth(BaseModel):
    role: str
    model: str
    pid: int
    fingerprint: str
    dtype: str
    block_size: int
    max_model_len: int
    running: int
    waiting: int
    counters: dict[str, int]
