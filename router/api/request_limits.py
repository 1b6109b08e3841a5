"""What one request may ask for: the `max_*` limits of RouterSettings, each a 400 naming the
field. Counts are checked before any tokenizing (they bound that work); the token total once
the prompts are tokenized. The body's size is capped earlier still (router/limits.py)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from router.errors import APIError
from router.settings import RouterSettings

# OpenAI's codes for a value over its limit.
TOO_MANY = "array_above_max_length"
TOO_LONG = "string_above_max_length"
TOO_BIG = "integer_above_max_value"


def at_most(count: int, limit: int, param: str, what: str, code: str = TOO_MANY) -> None:
    if count > limit:
        raise APIError(
            400, f"Invalid `{param}`: {count} {what}, and this server allows at most {limit}.",
            param=param, code=code,
        )


def check_text(texts: Iterable[str], settings: RouterSettings, param: str) -> None:
    """Characters to tokenize, summed over the request: they bound the tokenizer's work."""
    total = sum(len(t) for t in texts)
    at_most(total, settings.max_text_chars, param, "characters of text", TOO_LONG)


def prompt_count(prompt: str | list) -> int:
    """Prompts in a completion's `prompt`: a string or a token-id list is one."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return 1
    return len(prompt)


def check_shape(
    req, settings: RouterSettings, num_prompts: int, logprobs: int | None, logprobs_param: str
) -> None:
    """The sampling fields both endpoints share (a CompletionRequest or ChatCompletionRequest)."""
    n = req.n or 1
    at_most(n, settings.max_n, "n", "choices per prompt", TOO_BIG)
    if num_prompts * n > settings.max_choices:
        raise APIError(
            400, f"{num_prompts} prompt(s) x n={n} is more than the {settings.max_choices} "
            "choices this server allows per request.", param="n", code=TOO_BIG,
        )
    stops = req.stop_strings()
    at_most(len(stops), settings.max_stop_strings, "stop", "stop strings")
    at_most(max(map(len, stops), default=0), settings.max_stop_chars, "stop",
            "characters in a stop string", TOO_LONG)
    at_most(len(req.logit_bias or {}), settings.max_logit_bias, "logit_bias", "entries")
    if logprobs is not None:
        at_most(logprobs, settings.max_logprobs, logprobs_param, "alternatives per token",
                TOO_BIG)


def check_request_tokens(
    settings: RouterSettings, prompt_lens: Sequence[int], budgets: Sequence[int], n: int,
    param: str,
) -> None:
    """Every choice costs its prompt plus its completion budget (max_tokens 0 still computes
    one token): the work one request can put on the workers."""
    total = n * sum(p + max(1, b) for p, b in zip(prompt_lens, budgets, strict=True))
    if total > settings.max_request_tokens:
        raise APIError(
            400, f"This request could cost {total} tokens ({len(prompt_lens)} prompt(s) x "
            f"n={n} x (prompt + completion)), more than the {settings.max_request_tokens} this "
            f"server allows per request. Lower `{param}`, `n` or the number of prompts.",
            param=param, code="request_too_large",
        )
