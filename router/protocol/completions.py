"""POST /v1/completions: the request body (fields in OpenAI's order, then vLLM's extras), the
response and its stream chunks (the same shape).

Each request converts itself once into the engine's `SamplingParams`; the cross-field checks
that pydantic cannot express with a `param` path live in `check()`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    StrictStr,
    field_validator,
)
from pydantic_core import PydanticCustomError

from engine.sampling_params import Guide, SamplingParams
from router.protocol.common import (
    MAX_PROMPTS,
    CacheSalt,
    Encodable,
    Flag,
    LogitBias,
    MinP,
    MinTokens,
    ModelName,
    N,
    Penalty,
    RepetitionPenalty,
    Seed,
    Stop,
    StopTokenIds,
    StreamOptions,
    Temperature,
    TokenIds,
    TopK,
    TopP,
    Usage,
    WireModel,
    _Sampling,
)
from router.protocol.structured import (
    GuidedChoice,
    GuidedGrammar,
    GuidedJson,
    GuidedRegex,
    ResponseFormat,
    StructuredOutputs,
    _Guided,
)

Prompt = Annotated[
    StrictStr
    | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)],
    Encodable,
]


class CompletionRequest(_Sampling, _Guided, WireModel):
    model: ModelName
    prompt: Prompt = Field(
        description="a string, strings, token ids, or lists of token ids (one choice set each)"
    )
    echo: Flag = False
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias = None
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(
        16, ge=0, description="0 with echo: score the prompt only; null: fill the context"
    )
    n: N = 1
    presence_penalty: Penalty = 0.0
    seed: Seed = None
    stop: Stop = None
    stream: Flag = False
    stream_options: StreamOptions | None = None
    suffix: None = Field(None, description="not supported: must be absent or null")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    user: StrictStr | None = None
    # vLLM extras
    top_k: TopK = None
    min_p: MinP = None
    repetition_penalty: RepetitionPenalty = None
    ignore_eos: Flag = False
    min_tokens: MinTokens = None
    stop_token_ids: StopTokenIds = None
    include_stop_str_in_output: Flag = False
    skip_special_tokens: Flag = True
    cache_salt: CacheSalt = None
    response_format: ResponseFormat | None = None
    guided_json: GuidedJson = None
    guided_regex: GuidedRegex = None
    guided_choice: GuidedChoice = None
    guided_grammar: GuidedGrammar = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("suffix", mode="before")
    @classmethod
    def _no_suffix(cls, value: Any) -> Any:
        if value is None:
            return value
        raise PydanticCustomError("unsupported", "`suffix` is not supported by this server")

    def check(self) -> None:
        self.check_common(self.max_tokens)

    def to_sampling_params(self, max_tokens: int, seed: int, vocab_size: int,
                           guide: Guide | None = None) -> SamplingParams:
        """max_tokens 0 (echo scoring) asks the backend for one token, which is dropped: the
        backend then runs the prefill that yields the prompt logprobs."""
        params = self.sampling_params(
            max_tokens=max(max_tokens, 1), seed=seed, logprobs=self.logprobs,
            vocab_size=vocab_size,
        )
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs
        params.guide = guide
        return params


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """Also the shape of each stream chunk (OpenAI reuses `text_completion` for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None
