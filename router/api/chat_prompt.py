"""Chat messages through the chat template to prompt ids, tools and tool turns included.

A template that knows tools (it reads `tools`, as Qwen2.5's and Llama 3.1's do) gets them as
transformers passes them: `tools=`, assistant turns with `tool_calls` (arguments as objects)
and `tool` turns. A template that does not (SmolLM2-135M's is plain ChatML and ignores
`tools`) gets the Hermes format (which many open chat models use), written into the
messages: the tool list in the system turn, calls as `<tool_call>` blocks in the assistant's
text, answers as `<tool_response>` blocks. router/output/tool_calls.py parses the same blocks
back out of the model's answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from router.errors import bad_request
from router.protocol.chat import AssistantTurn, ChatMessage, ToolMessage
from router.protocol.tools import ChatTool, call_arguments, tools_json

TOOLS_PREAMBLE = (
    "You are a function calling AI model. You may call one or more functions to assist with "
    "the user query. Function signatures are within <tools></tools> XML tags:\n<tools>\n{tools}"
    "\n</tools>\nFor each function call, return a JSON object with the function name and "
    "arguments within <tool_call></tool_call> tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def template_knows_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def conversation(
    messages: Sequence[ChatMessage], tools: list[ChatTool] | None, native: bool
) -> list[dict[str, Any]]:
    """The template's messages. `tools` is what the prompt should offer (None: no tools)."""
    turns = [_turn(m, native) for m in messages]
    if tools and not native:
        preamble = TOOLS_PREAMBLE.format(
            tools="\n".join(json.dumps(t["function"]) for t in tools_json(tools)))
        if turns and turns[0]["role"] == "system":
            turns[0] = {**turns[0], "content": preamble + "\n\n" + turns[0]["content"]}
        else:
            turns.insert(0, {"role": "system", "content": preamble})
    return turns


def _turn(m: ChatMessage, native: bool) -> dict[str, Any]:
    # "developer" is OpenAI's newer name for "system"; templates only know the latter.
    role = "system" if m.role == "developer" else m.role
    if isinstance(m, AssistantTurn) and m.tool_calls:
        calls = [{"name": c.function.name, "arguments": call_arguments(c)} for c in m.tool_calls]
        if native:
            return {"role": role, "content": m.text(), "tool_calls": [
                {"type": "function", "id": c.id, "function": f}
                for c, f in zip(m.tool_calls, calls, strict=True)]}
        blocks = "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)
        return {"role": role, "content": (m.text() + "\n" if m.text() else "") + blocks}
    if isinstance(m, ToolMessage):
        if native:
            return {"role": "tool", "content": m.text(), "tool_call_id": m.tool_call_id}
        return {"role": "tool", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
    return {"role": role, "content": m.text()}


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[ChatMessage],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[ChatTool] | None = None,
) -> str:
    """The templated prompt text. Template failures are the client's conversation's fault."""
    if not tokenizer.chat_template:
        raise bad_request("This model has no chat template; use /v1/completions.", "messages")
    if continue_final_message and messages[-1].role != "assistant":
        raise bad_request(
            "`continue_final_message` needs the last message to be from the assistant.",
            "messages",
        )
    try:
        native = template_knows_tools(tokenizer.chat_template)
        text = tokenizer.apply_chat_template(
            conversation(messages, tools, native),
            tools=tools_json(tools) if tools and native else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise bad_request(f"The chat template rejected the messages: {exc}", "messages") from exc
    assert isinstance(text, str)
    return text


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[ChatMessage],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
    tools: list[ChatTool] | None = None,
) -> list[int]:
    """Template, then tokenize. The template writes BOS/role tokens itself, so by default no
    special tokens are added on top (vLLM does the same). `tools`: the tools to offer."""
    text = render_chat(tokenizer, messages, add_generation_prompt, continue_final_message,
                       tools)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)
