"""The worker call bodies (wire/internal_api.py) a GenerateRequest turns into."""

from __future__ import annotations

from dataclasses import replace

from engine.sequence import TokenEvent
from router.dispatch.backend import GenerateRequest
from wire.internal_api import DecodeRequest, Fork, PrefillResponse


def as_fork(req: GenerateRequest) -> Fork:
    return Fork(request_id=req.request_id, params=req.params)


def decode_body(
    req: GenerateRequest, first: TokenEvent | None = None, stored: PrefillResponse | None = None,
    owner: str | None = None,
) -> DecodeRequest:
    """The decode call for `req`: its prompt, then `first` (the prefill worker's token) if
    any, with the tail `stored` by the prefill of request `owner` (a group's parent)."""
    body = DecodeRequest(
        request_id=req.request_id, token_ids=list(req.token_ids),
        num_prompt_tokens=len(req.token_ids), params=req.params, cache_salt=req.cache_salt,
    )
    if first is not None:
        body.token_ids.append(first.token_id)
        # The prompt logprobs came with the first token: decode must not recompute them.
        body.params = replace(req.params, prompt_logprobs=None)
    if stored is not None:
        body.tail_key, body.tail_start, body.tail_owner = (
            stored.tail_key, stored.tail_start, owner)
    return body
