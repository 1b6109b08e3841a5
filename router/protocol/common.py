"""What every endpoint's models share: field types with their constraints (which
/openapi.json shows), the sampling conversion, usage and the error envelope.

Models built on `WireModel` are strict: JSON `0` is not `false` and `"0.5"` is not a number,
as the OpenAI SDK always sends proper JSON types. Floats still accept integers.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
)
from pydantic_core import PydanticCustomError

from engine.sampling_params import SamplingParams
from router.errors import bad_request

log = logging.getLogger(__name__)

# Seeds are 64-bit signed on the wire (what vLLM and the OpenAI docs accept).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

# The schema's hard caps; RouterSettings' max_* fields may lower them, never raise them.
# A list's length is checked before its items, so a huge list costs one error. Item errors
# are what is expensive (~10 us each to report, on the event loop): lists without a cap
# stop at their first bad item (fail_fast).
MAX_PROMPTS = 2048  # OpenAI's cap on a prompt array
MAX_N = 128
MAX_STOP_STRINGS = 4  # OpenAI's
MAX_LOGIT_BIAS = 1024  # entries; a dict is validated whole before its length is looked at
MAX_TOP_LOGPROBS = 20  # OpenAI's (chat); completions' `logprobs` stops at 5
MAX_MESSAGES = 2048  # validating a message takes ~14 us (2-vCPU box): 2048 take ~30 ms


class WireModel(BaseModel):
    """A request body: strict types, finite floats, unknown fields kept (and logged) not refused."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

    def log_unknown_fields(self) -> None:
        # Guarded: a hostile body may carry a million unknown keys, not worth sorting unread.
        if self.model_extra and log.isEnabledFor(logging.DEBUG):
            log.debug("ignoring unknown fields: %s", sorted(self.model_extra)[:100])


def _encodable(value: Any) -> Any:
    """Every string in `value` (a string, or a list's string items) must be valid Unicode.
    JSON's `\\ud800` escapes decode to lone surrogates, which the tokenizer (and any UTF-8
    response) would fail on later, as a 500. Runs after the field's union matched, so the error
    names the field rather than a union branch."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for i, text in enumerate(items):
        if not isinstance(text, str) or text.isascii():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            where = f"item {i}, " if isinstance(value, list) else ""
            raise PydanticCustomError(
                "invalid_text", "{where}character {position} is a lone surrogate, which is not "
                "valid Unicode", {"where": where, "position": exc.start},
            ) from None
    return value


Encodable = AfterValidator(_encodable)


def _cap_logit_bias(value: Any) -> Any:
    if isinstance(value, dict) and len(value) > MAX_LOGIT_BIAS:
        raise PydanticCustomError(
            "too_long", "at most {max} entries are allowed, not {n}",
            {"max": MAX_LOGIT_BIAS, "n": len(value)},
        )
    return value


_DIGITS = re.compile(r"^[0-9]+$")  # ASCII only: str.isdigit() also takes other scripts' digits


def _token_id_key(key: str) -> str:
    """logit_bias keys are token ids written as JSON strings ("50256")."""
    if not _DIGITS.match(key):
        raise PydanticCustomError("token_id", "keys must be token ids (non-negative integers)")
    return key


Text = Annotated[StrictStr, Encodable]
# Marks token-id schemas: /openapi.json bounds them by the served vocabulary
# (router/api/openapi_docs.py); the server checks the bound itself (400) once it knows the model.
TOKEN_ID_MARK = "x-token-id"
TokenId = Annotated[
    int, Field(ge=0, description="a token id, below the model's `vocab_size` (GET "
               "/tokenizer_info)", json_schema_extra={TOKEN_ID_MARK: True}),
]
TokenIds = Annotated[list[TokenId], Field(min_length=1, fail_fast=True)]

ModelName = Annotated[Text, Field(min_length=1, description="a model id from GET /v1/models")]
Temperature = Annotated[float | None, Field(ge=0, le=2, description="0 means greedy")]
TopP = Annotated[float | None, Field(gt=0, le=1)]
N = Annotated[int | None, Field(ge=1, le=MAX_N, description="choices per prompt")]
Penalty = Annotated[float | None, Field(ge=-2, le=2)]
Seed = Annotated[
    int | None,
    Field(ge=SEED_MIN, le=SEED_MAX, description="same seed + same request = same output"),
]
Stop = Annotated[
    StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None,
    Encodable,
    Field(description=f"up to {MAX_STOP_STRINGS} strings; the text is cut before the first"),
]
_Bias = Annotated[float, Field(ge=-100, le=100)]
_BiasMap = Annotated[
    dict[Annotated[str, AfterValidator(_token_id_key)], _Bias],
    Field(json_schema_extra={"propertyNames": {"pattern": _DIGITS.pattern},
                             "maxProperties": MAX_LOGIT_BIAS}),
]
LogitBias = Annotated[
    _BiasMap | None,
    BeforeValidator(_cap_logit_bias),
    Field(description=f"token id (as a string, below the model's `vocab_size`) -> bias added "
          f"to its logit; at most {MAX_LOGIT_BIAS} entries"),
]
Flag = StrictBool | None  # null is accepted wherever OpenAI documents a default

# vLLM's extra sampling controls, accepted because benchmark clients send them.
TopK = Annotated[int | None, Field(ge=-1, description="-1 or 0 disables")]
MinP = Annotated[float | None, Field(ge=0, le=1)]
RepetitionPenalty = Annotated[float | None, Field(gt=0, le=100)]
MinTokens = Annotated[int | None, Field(ge=0)]
StopTokenIds = Annotated[list[TokenId] | None, Field(max_length=1024)]
CacheSalt = Annotated[
    Text | None, Field(max_length=256, description="tenant namespace for the prefix cache")
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
