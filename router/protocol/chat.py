"""POST /v1/chat/completions: the request body (fields in OpenAI's order, then vLLM's extras),
the response and its stream chunks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictStr,
    Tag,
    model_serializer,
)

from engine.sampling_params import Guide, SamplingParams
from router.errors import bad_request
from router.protocol.common import (
    MAX_MESSAGES,
    MAX_TOP_LOGPROBS,
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
    Text,
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
from router.protocol.tools import (
    MAX_TOOLS,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Tools,
    tool_guide,
    tool_mode,
)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"] = Field(description="only text parts are supported")
    text: Text


Content = Annotated[StrictStr | Annotated[list[TextPart], Field(fail_fast=True)], Encodable]


class _Turn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    def text(self) -> str:
        content = getattr(self, "content", None)
        if isinstance(content, list):
            return "\n".join(part.text for part in content)
        return content or ""


class PromptMessage(_Turn):
    """A system, developer or user turn: `content` is required."""

    role: Literal["system", "developer", "user"]
    content: Content
    name: StrictStr | None = None


class AssistantTurn(_Turn):
    """An earlier assistant turn: only it may omit `content` (OpenAI: when it made tool calls)."""

    role: Literal["assistant"]
    content: Content | None = None
    name: StrictStr | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None


class ToolMessage(_Turn):
    """A tool's answer to an earlier call."""

    role: Literal["tool"]
    content: Content
    tool_call_id: StrictStr


def _message_kind(message: Any) -> str:
    role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
    # Anything else is checked as a prompt message, so a missing or unknown role is reported
    # at `messages.<i>.role`.
    return {"assistant": "message-assistant", "tool": "message-tool"}.get(role, "message-prompt")


# A union on `role`, so /openapi.json says which roles require `content` (oneOf). Tags contain
# '-' so the error formatter drops them from `param` paths.
ChatMessage = Annotated[
    Annotated[PromptMessage, Tag("message-prompt")]
    | Annotated[AssistantTurn, Tag("message-assistant")]
    | Annotated[ToolMessage, Tag("message-tool")],
    Discriminator(_message_kind),
]


Messages = Annotated[
    list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True)
]


class ChatCompletionRequest(_Sampling, _Guided, WireModel):
    messages: Messages
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
    tool_choice: ToolChoice | None = None
    tools: Tools | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
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
    guided_json: GuidedJson = None
    guided_regex: GuidedRegex = None
    guided_choice: GuidedChoice = None
    guided_grammar: GuidedGrammar = None
    structured_outputs: StructuredOutputs | None = None

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

    def tool_mode(self) -> str:
        """"none", "auto", "required" or the forced function's name."""
        return tool_mode(self.tools, self.tool_choice)

    def output_guide(self) -> tuple[str, Guide] | None:
        """What constrains the output, and the field that asked: a forced tool call, or a
        structured-output field. Builds the schema text: call it once per request."""
        forced = tool_guide(self.tools or [], self.tool_mode())
        requested = self.guide()
        if forced is not None and requested is not None:
            raise bad_request("A forced tool call already constrains the output; drop the "
                              "structured-output field.", "tool_choice")
        return ("tool_choice", forced) if forced is not None else requested

    def to_sampling_params(self, max_tokens: int, seed: int, vocab_size: int,
                           guide: Guide | None = None) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self.sampling_params(
            max_tokens=max_tokens, seed=seed, logprobs=logprobs, vocab_size=vocab_size
        )
        params.guide = guide
        return params


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends only what the delta carries: {"content": "x"}, and {} at the end.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None
