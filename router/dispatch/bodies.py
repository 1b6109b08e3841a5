"""The worker call bodies (wire/internal_api.py) a GenerateRequest turns into."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from router.dispatch.backend import GenerateRequest
from wire.internal_api import DecodeRequest, Fork, PrefillResponse


def as_fork(req: GenerateRequest) -> Fork:
    return Fork(request_id=req.request_id, params=req.params)


def decode_body(
    req: GenerateRequest, generated: Sequence[int] = (), stored: PrefillResponse | None = None,
    owner: str | None = None,
) -> DecodeRequest:
    """The decode call for `req`: its prompt, then the tokens it already has (the prefill
    worker's first one, or everything before a failover), with the tail `stored` by the
    prefill of request `owner` (a group's parent)."""
    body = DecodeRequest(
        request_id=req.request_id, token_ids=[*req.token_ids, *generated],
        num_prompt_tokens=len(req.token_ids), params=req.params, cache_salt=req.cache_salt,
    )
    if generated:
        # The prompt logprobs came with the first token: decode must not recompute them.
        body.params = replace(req.params, prompt_logprobs=None)
    if stored is not None:
        body.tail_key, body.tail_start, body.tail_owner = (
            stored.tail_key, stored.tail_start, owner)
    return body
