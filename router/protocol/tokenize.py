"""Bodies and replies of vLLM's tokenizer endpoints: POST /tokenize (a prompt or chat
messages), /detokenize."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
)

from router.protocol.chat import Messages
from router.protocol.common import ModelName, Text, TokenId, WireModel


class TokenizePromptRequest(WireModel):
    # A body with `messages` is a chat body, whatever else it holds: say so, so that exactly
    # one branch of the request's oneOf matches.
    model_config = ConfigDict(json_schema_extra={"not": {"required": ["messages"]}})

    model: ModelName | None = Field(None, description="default: the first served model")
    prompt: Text
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(WireModel):
    model: ModelName | None = Field(None, description="default: the first served model")
    messages: Messages
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False  # the chat template already has them
    return_token_strs: StrictBool = False


def _kind(body: Any) -> str:
    return "tokenize-chat" if isinstance(body, dict) and "messages" in body else "tokenize-prompt"


# Tags contain '-' so the error formatter drops them from `param` paths.
TokenizeRequest = Annotated[
    Annotated[TokenizePromptRequest, Tag("tokenize-prompt")]
    | Annotated[TokenizeChatRequest, Tag("tokenize-chat")],
    Discriminator(_kind),
]


class DetokenizeRequest(WireModel):
    model: ModelName | None = Field(None, description="default: the first served model")
    tokens: Annotated[list[TokenId], Field(fail_fast=True)]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
