"""Chat messages -> prompt token ids, through the model's own chat template."""

from __future__ import annotations

from collections.abc import Sequence

import jinja2
from transformers import PreTrainedTokenizerBase

from router.errors import bad_request
from router.protocol import ChatMessage


def _conversation(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    # "developer" is OpenAI's newer name for "system"; templates only know the latter.
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in messages
    ]


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[ChatMessage],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
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
        text = tokenizer.apply_chat_template(
            _conversation(messages),
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
) -> list[int]:
    """Template, then tokenize. The template writes BOS/role tokens itself, so by default no
    special tokens are added on top (vLLM does the same)."""
    text = render_chat(tokenizer, messages, add_generation_prompt, continue_final_message)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)
