"""Field types shared by the wire models, with their constraints (which /openapi.json shows).

Models built on `WireModel` are strict: JSON `0` is not `false` and `"0.5"` is not a number,
as the OpenAI SDK always sends proper JSON types. Floats still accept integers.
"""

from __future__ import annotations

import logging
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool
from pydantic_core import PydanticCustomError

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
