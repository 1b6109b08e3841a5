"""From a validated request to the backend calls: prompt ids, context check, seeds, choices."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine.grammar import GuideError
from engine.sampling_params import Guide, SamplingParams
from router.dispatch.backend import GenerateRequest
from router.errors import APIError, bad_request
from router.model_info import ServedModel
from router.output.generation import ChoicePlan, OutputOptions


@dataclass(slots=True)
class PromptInput:
    token_ids: list[int]
    text: str | None = None  # the prompt as the client wrote it (echo); None for token ids


def check_token_ids(model: ServedModel, ids: Sequence[int], param: str) -> None:
    bad = next((i for i in ids if i >= model.vocab_size), None)
    if bad is not None:
        raise bad_request(
            f"Token id {bad} in `{param}` is out of range: the vocabulary has "
            f"{model.vocab_size} tokens.", param,
        )


def check_sampling_tokens(req, model: ServedModel) -> None:
    """Token ids inside sampling fields must exist in this model's vocabulary."""
    check_token_ids(model, req.stop_token_ids or [], "stop_token_ids")
    for key in req.logit_bias or {}:
        if int(key) >= model.vocab_size:
            raise bad_request(
                f"Token id {key} in `logit_bias` is out of range: the vocabulary has "
                f"{model.vocab_size} tokens.", f"logit_bias.{key}",
            )


def checked_guide(model: ServedModel, found: tuple[str, Guide] | None) -> Guide | None:
    """A request's structured-output guide (with the field it came from), compiled now (once
    per distinct guide: cached), so one the engine cannot run is the client's 400, naming what
    the grammar engine does not support."""
    if found is None:
        return None
    param, guide = found
    try:
        model.grammars.compile(guide)
    except GuideError as exc:
        raise bad_request(f"The `{param}` constraint cannot be used: {exc}", param,
                          "invalid_guide") from None
    return guide


def completion_prompts(model: ServedModel, prompt: str | list) -> list[PromptInput]:
    """A string, strings, token ids, or lists of token ids -> one PromptInput each. Token ids
    are range-checked later (`check_prompt_ids`), once the context check bounds their count."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    inputs = []
    for p in prompt:
        if isinstance(p, str):
            inputs.append(PromptInput(model.tokenizer.encode(p, add_special_tokens=True), p))
        else:
            inputs.append(PromptInput(list(p)))
    if any(not p.token_ids for p in inputs):
        raise bad_request("The prompt is empty (it encodes to no tokens).", "prompt")
    return inputs


def check_prompt_ids(model: ServedModel, prompts: Sequence[PromptInput]) -> None:
    """Prompts sent as token ids hold only this model's ids (the engine refuses others)."""
    for p in prompts:
        if p.text is None:
            check_token_ids(model, p.token_ids, "prompt")


def check_context(
    model: ServedModel, prompt_len: int, max_tokens: int, where: str, param: str
) -> None:
    """400 context_length_exceeded, worded as OpenAI/vLLM word it. The engine computes at
    least one token (max_tokens 0 too: echo scoring drops it), and refuses a sequence that
    leaves it no room: prompt + max(1, max_tokens) must fit."""
    completion = max(1, max_tokens)
    total = prompt_len + completion
    if total > model.max_model_len:
        note = " (max_tokens 0 still computes one)" if max_tokens < 1 else ""
        raise APIError(
            400,
            f"This model's maximum context length is {model.max_model_len} tokens. However, "
            f"you requested {total} tokens ({prompt_len} in the {where}, {completion} in the "
            f"completion{note}). Please reduce the length of the {where} or completion.",
            param=param, code="context_length_exceeded",
        )


def resolve_max_tokens(
    model: ServedModel, prompt_len: int, requested: int | None, where: str, param: str
) -> int:
    """The completion budget: as requested, or (None) whatever the context has left."""
    budget = requested if requested is not None else max(model.max_model_len - prompt_len, 1)
    check_context(model, prompt_len, budget, where, param)
    return budget


def check_min_tokens(min_tokens: int | None, budget: int) -> None:
    """The engine refuses min_tokens > max_tokens; with max_tokens omitted the budget is what
    the context leaves, which the wire check (`check_common`) could not know."""
    if (min_tokens or 0) > max(1, budget):
        raise bad_request(
            f"`min_tokens` ({min_tokens}) must not exceed the {budget} completion tokens the "
            "context leaves.", "min_tokens",
        )


def base_seed(seed: int | None) -> int:
    """Always a seed, so a failover resumes the exact same text."""
    return seed if seed is not None else secrets.randbits(63)


def derive_seed(seed: int, j: int) -> int:
    """Choice j's seed: j=0 keeps the request seed (n=1 and n>1 agree on choice 0); the others
    are a hash of (seed, j), so choices differ but repeat with the same request seed."""
    if j == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: a non-negative int64


def plan_choices(
    request_id: str,
    model: ServedModel,
    prompts: Sequence[PromptInput],
    prompt_params: Sequence[SamplingParams],
    n: int,
    options: OutputOptions,
    cache_salt: str = "",
) -> list[ChoicePlan]:
    """One backend call per (prompt, j), choice index prompt_index * n + j; `prompt_params`
    has each prompt's parameters. Request ids are `<the completion's id>-<index>`."""
    plans = []
    for p_idx, (prompt, params) in enumerate(zip(prompts, prompt_params, strict=True)):
        assert params.seed is not None, "the router always seeds"
        for j in range(n):
            index = p_idx * n + j
            request = GenerateRequest(
                request_id=f"{request_id}-{index}",
                model=model.name,
                token_ids=prompt.token_ids,
                params=replace(params, seed=derive_seed(params.seed, j)),
                cache_salt=cache_salt,
            )
            plans.append(ChoicePlan(index, p_idx, request, options))
    return plans


def output_options(
    req, model: ServedModel, top_logprobs: int | None, drop_output: bool
) -> OutputOptions:
    """The router-side half of a request (CompletionRequest or ChatCompletionRequest)."""
    stop_ids = set(req.stop_token_ids or [])
    if not req.ignore_eos:
        stop_ids |= model.eos_token_ids
    return OutputOptions(
        stop=req.stop_strings(),
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        skip_special_tokens=req.skip_special_tokens is not False,
        stop_token_ids=frozenset(stop_ids),
        min_tokens=req.min_tokens or 0,
        drop_output=drop_output,
        top_logprobs=top_logprobs,
    )
