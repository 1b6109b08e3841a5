"""What every endpoint's models share: field types with their constraints (which
/openapi.json shows), the sampling conversion, usage and the error envelope.

Models built on `WireModel` are strict: JSON `0` is not `false` and `"0.5"` is not a number,
as the OpenAI SDK always sends proper JSON types. Floats still accept integers.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
)
from pydantic_core import PydanticCustomError

from engine.sampling_params import SamplingParams
from router.errors import bad_request

log = logging.getLogger(__name__)

# Seeds are 64-bit signed on the wire (what vLLM and the OpenAI docs accept).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRINGS = 4


class WireModel(BaseModel):
    """A request body: strict types, finite floats, unknown fields kept (and logged) not refused."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

    def log_unknown_fields(self) -> None:
        if self.model_extra:
            log.debug("ignoring unknown fields: %s", sorted(self.model_extra))


def _token_id_key(key: str) -> str:
    """logit_bias keys are token ids written as JSON strings ("50256")."""
    if not key.lstrip("-").isdigit() or int(key) < 0:
        raise PydanticCustomError("token_id", "keys must be token ids (non-negative integers)")
    return key


TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]

ModelName = Annotated[str, Field(description="a model id from GET /v1/models")]
Temperature = Annotated[float | None, Field(ge=0, le=2, description="0 means greedy")]
TopP = Annotated[float | None, Field(gt=0, le=1)]
N = Annotated[int | None, Field(ge=1, le=128, description="choices per prompt")]
Penalty = Annotated[float | None, Field(ge=-2, le=2)]
Seed = Annotated[
    int | None,
    Field(ge=SEED_MIN, le=SEED_MAX, description="same seed + same request = same output"),
]
Stop = Annotated[
    str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None,
    Field(description=f"up to {MAX_STOP_STRINGS} strings; the text is cut before the first"),
]
LogitBias = Annotated[
    dict[Annotated[str, AfterValidator(_token_id_key)], Annotated[float, Field(ge=-100, le=100)]]
    | None,
    Field(description="token id (as a string) -> bias added to its logit"),
]
Flag = StrictBool | None  # null is accepted wherever OpenAI documents a default

# vLLM's extra sampling controls, accepted because benchmark clients send them.
TopK = Annotated[int | None, Field(ge=-1, description="-1 or 0 disables")]
MinP = Annotated[float | None, Field(ge=0, le=1)]
RepetitionPenalty = Annotated[float | None, Field(gt=0, le=100)]
MinTokens = Annotated[int | None, Field(ge=0)]
StopTokenIds = Annotated[list[TokenId] | None, Field(max_length=1024)]
CacheSalt = Annotated[
    str | None, Field(max_length=256, description="tenant namespace for the prefix cache")
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: Flag = False
    continuous_usage_stats: Flag = False  # vLLM: usage on every chunk


class _Sampling:
    """Conversion shared by both requests. A mixin rather than a base model, so each model
    keeps OpenAI's field order; it reads fields both models declare."""

    def stop_strings(self) -> list[str]:
        stop = self._fields().stop
        return [stop] if isinstance(stop, str) else list(stop or [])

    def _fields(self) -> Any:
        return self

    def check_common(self, max_tokens: int | None) -> None:
        r = self._fields()
        if r.stream_options is not None and not r.stream:
            raise bad_request(
                "`stream_options` is only allowed when `stream` is true.", "stream_options"
            )
        min_tokens = r.min_tokens or 0
        if max_tokens is not None and min_tokens > max_tokens:
            raise bad_request(
                f"`min_tokens` ({min_tokens}) must not exceed the maximum number of "
                f"completion tokens ({max_tokens}).", "min_tokens",
            )

    def sampling_params(
        self, *, max_tokens: int, seed: int, logprobs: int | None, vocab_size: int
    ) -> SamplingParams:
        r = self._fields()
        top_k = r.top_k or 0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if r.temperature is None else r.temperature,
            top_p=1.0 if r.top_p is None else r.top_p,
            top_k=min(top_k, vocab_size) if top_k > 0 else 0,
            min_p=r.min_p or 0.0,
            presence_penalty=r.presence_penalty or 0.0,
            frequency_penalty=r.frequency_penalty or 0.0,
            repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
            logit_bias={int(k): v for k, v in (r.logit_bias or {}).items()},
            seed=seed,
            logprobs=logprobs,
            min_tokens=r.min_tokens or 0,
            stop_token_ids=list(r.stop_token_ids or []),
            ignore_eos=bool(r.ignore_eos),
        )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens whose KV came from the cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


# The SSE body of a streaming request, for /openapi.json.
SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events, `data: <chunk JSON>` per chunk, then "
    "`data: [DONE]`. An error after the stream started arrives as `data: {\"error\": {...}}`."
)
