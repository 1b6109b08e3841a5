"""Tool calling on the wire: `tools`, `tool_choice`, the calls an assistant turn carries (in
the request's history and in the response) and their stream deltas, as OpenAI shapes them.

`tool_choice` "required" and a named function constrain the output (a Guide, see
`tool_guide`); "auto" leaves the model free and parses its `<tool_call>` blocks
(router/output/tool_calls.py).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictStr,
    model_serializer,
)

from engine.sampling_params import Guide
from router.errors import bad_request
from router.protocol.structured import json_guide

MAX_TOOLS = 128
FunctionName = Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
# A function without `parameters` takes an empty object (OpenAI).
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: FunctionName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionRef(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: FunctionRef


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
Tools = Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)]


class FunctionCall(BaseModel):
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call in a response, or in an earlier assistant turn of the request."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A stream's piece of a call: the first carries id, type and name; the rest append to
    `arguments` (the SDKs join them by `index`)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = {k: v for k, v in handler(self).items() if v is not None}
        if isinstance(out.get("function"), dict):
            out["function"] = {k: v for k, v in out["function"].items() if v is not None}
        return out


def tool_mode(tools: list[ChatTool] | None, choice: ToolChoice | None) -> str:
    """"none", "auto", "required" or a function's name. OpenAI's default is "auto" with tools
    and "none" without; a choice without tools is the client's error."""
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("`tool_choice` needs `tools`.", "tool_choice")
        return "none"
    if choice is None:
        return "auto"
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in {t.function.name for t in tools}:
            raise bad_request(f"tool_choice names {name!r}, which is not in `tools`.",
                              "tool_choice")
        return name
    return choice


def tool_guide(tools: list[ChatTool], mode: str) -> Guide | None:
    """The constraint a mode puts on the output: a named function's arguments object, or for
    "required" a JSON array of one or more {"name", "arguments"} calls (vLLM's form)."""
    if mode in ("none", "auto"):
        return None
    by_name = {t.function.name: t.function.parameters or NO_PARAMETERS for t in tools}
    if mode != "required":
        return json_guide(by_name[mode], "tools")
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, params in by_name.items()]
    return json_guide({"type": "array", "minItems": 1, "items": {"anyOf": calls}}, "tools")


def tools_json(tools: list[ChatTool]) -> list[dict[str, Any]]:
    """The tools as chat templates take them (transformers' `tools=`)."""
    return [t.model_dump(exclude_none=True) for t in tools]


def call_arguments(call: ToolCall) -> Any:
    """An earlier call's arguments as an object, for a template (a string that is not JSON
    stays a string)."""
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments
