"""Request bodies of the OpenAI API, fields in OpenAI's order, then vLLM's extras.

Each request converts itself once into the engine's `SamplingParams`; the cross-field checks
that pydantic cannot express with a `param` path live in `check()`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator
from pydantic_core import PydanticCustomError

from engine.sampling_params import SamplingParams
from router.errors import bad_request
from router.protocol_fields import (
    CacheSalt,
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
    WireModel,
)

# OpenAI caps a prompt array at 2048 entries.
Prompt = (
    StrictStr
    | Annotated[list[StrictStr], Field(min_length=1, max_length=2048)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=2048)]
)


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


class CompletionRequest(_Sampling, WireModel):
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
    suffix: StrictStr | None = Field(None, description="not supported: must be absent or null")
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

    def check(self) -> None:
        if self.suffix is not None:
            raise bad_request("`suffix` is not supported by this server.", "suffix")
        self.check_common(self.max_tokens)

    def to_sampling_params(self, max_tokens: int, seed: int, vocab_size: int) -> SamplingParams:
        """max_tokens 0 (echo scoring) asks the backend for one token, which is dropped: the
        backend then runs the prefill that yields the prompt logprobs."""
        params = self.sampling_params(
            max_tokens=max(max_tokens, 1), seed=seed, logprobs=self.logprobs,
            vocab_size=vocab_size,
        )
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs
        return params


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"] = Field(description="only text parts are supported")
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    # validate_default: a missing content must reach _content_required too.
    content: StrictStr | list[TextPart] | None = Field(None, validate_default=True)
    name: StrictStr | None = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info) -> Any:
        # Only an assistant turn may omit content (OpenAI: when it made tool calls).
        if value is None and info.data.get("role", "assistant") != "assistant":
            raise PydanticCustomError("missing", "content is required for this role")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["text"] = Field(description="only plain text output is supported")


class ChatCompletionRequest(_Sampling, WireModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: ModelName
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias = None
    logprobs: Flag = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias")
    n: N = 1
    presence_penalty: Penalty = 0.0
    response_format: ResponseFormat | None = None
    seed: Seed = None
    stop: Stop = None
    stream: Flag = False
    stream_options: StreamOptions | None = None
    temperature: Temperature = 1.0
    tool_choice: Literal["none"] | None = Field(None, description="tools are not supported")
    tools: list[dict[str, Any]] | None = Field(None, description="must be absent or empty")
    top_logprobs: int | None = Field(None, ge=0, le=20)
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
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False

    @field_validator("tools", "tool_choice", mode="before")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        if value in (None, [], "none"):
            return value
        raise PydanticCustomError("unsupported", "tool calling is not supported by this server")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("`top_logprobs` requires `logprobs` to be true.", "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise bad_request(
                "`continue_final_message` needs `add_generation_prompt` false.",
                "continue_final_message",
            )
        self.check_common(self.requested_max_tokens())

    def to_sampling_params(self, max_tokens: int, seed: int, vocab_size: int) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(
            max_tokens=max_tokens, seed=seed, logprobs=logprobs, vocab_size=vocab_size
        )
