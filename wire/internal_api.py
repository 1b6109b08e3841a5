"""Wire models of the internal worker APIs (JSON / NDJSON over HTTP). Token ids only; KV
tensors travel through the store, never over these calls."""

from __future__ import annotations

from dataclasses import asdict

from pydantic import BaseModel

from engine.sampling_params import SamplingParams

INTERNAL_TOKEN_HEADER = "X-Tandem-Token"


def params_to_wire(p: SamplingParams) -> dict:
    d = asdict(p)
    d["logit_bias"] = {str(k): v for k, v in p.logit_bias.items()}
    return d


def params_from_wire(d: dict) -> SamplingParams:
    d = dict(d)
    d["logit_bias"] = {int(k): float(v) for k, v in d.get("logit_bias", {}).items()}
    return SamplingParams(**d)


class WireEvent(BaseModel):
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    num_cached_tokens: int | None = None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None


class PrefillRequest(BaseModel):
    request_id: str
    token_ids: list[int]
    params: dict
    cache_salt: str = ""


class PrefillResponse(BaseModel):
    """The first line of /prefill's NDJSON body, sent as soon as the first token is sampled;
    a `PrefillCommitted` line follows once the prompt's KV is in the store."""

    event: WireEvent  # the first generated token
    num_cached_tokens: int  # prompt tokens whose KV came from the store
    num_computed_tokens: int
    tail_key: str | None = None  # request-scoped key of the prompt's partial last block
    tail_start: int = 0  # token position where the tail begins


class PrefillCommitted(BaseModel):
    """The last line of /prefill's body: the blocks and tail are stored, decode may load them."""

    committed: bool = True
    stored_bytes: int = 0


class DecodeRequest(BaseModel):
    request_id: str
    token_ids: list[int]  # prompt + every token generated so far
    num_prompt_tokens: int
    params: dict
    cache_salt: str = ""
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
