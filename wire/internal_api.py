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
    """One NDJSON line: the event's set fields. `seq_id` is the request id (or, for a call
    with forks, the fork's) the router gave the sequence."""
    return _EVENT.dump_json(ev, exclude_none=True).decode() + "\n"


def parse_event(line: str | bytes) -> TokenEvent:
    """Raises pydantic.ValidationError (a ValueError) on a malformed line."""
    return _EVENT.validate_json(line)


class Fork(BaseModel):
    """Another choice of the same prompt (n > 1): its own id and sampling parameters."""

    request_id: str
    params: SamplingParams


class SequenceRequest(BaseModel):
    """What both worker calls carry. `params` travels as the engine's own SamplingParams."""

    request_id: str
    token_ids: list[int]  # prefill: the prompt; decode: prompt + every token generated so far
    params: SamplingParams
    cache_salt: str = ""
    # The prompt's other choices, forked off this sequence before its first sample so the
    # prompt is computed once (Engine.fork). Only while nothing is generated yet; their
    # events carry their own request id as `seq_id`.
    forks: list[Fork] = []


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
    forks: list[TokenEvent] = []  # the forks' first tokens, in the request's order


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
    # Whose prefill stored the tail (the key is derived from that request id): a fork of the
    # prompt loads the tail its parent's prefill stored. Default: this request.
    tail_owner: str | None = None


class AbortRequest(BaseModel):
    """POST /abort: stop one sequence of a call that carries others (a fork the router no
    longer wants, e.g. it hit a stop string); the call's other sequences go on."""

    request_id: str


class WorkerHealth(BaseModel):
    role: str
    model: str
    pid: int
    fingerprint: str
    dtype: str  # the KV format its blocks are stored in: the model's dtype, or int8 / uint4
    block_size: int
    max_model_len: int
    running: int
    waiting: int
    counters: dict[str, int]
    # One per process (a restart gets a new one): two URLs that reach the same process (a
    # compose service name and the address the worker advertises) are one worker to a router.
    instance_id: str = ""
    page_size: int = 0  # tokens per device KV page: the grain of the resident-page summary
    kv_summary_version: int = 0  # changes whenever GET /kv_summary would answer differently


class KVSummary(BaseModel):
    """GET /kv_summary: the page digests resident on the worker's device, as a Bloom filter
    (engine/resident_filter.py), base64 of `bits` / 8 bytes."""

    version: int
    page_size: int
    bits: int
    hashes: int
    packed: str
