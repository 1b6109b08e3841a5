"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends

from router.api.body import ThreadParsedRoute
from router.api.chat import check_messages
from router.api.chat_prompt import chat_prompt_ids
from router.api.openapi_docs import error_responses
from router.api.planning import check_token_ids
from router.api.request_limits import check_text
from router.auth import require_api_key
from router.deps import JsonBody, State
from router.model_info import ServedModel
from router.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from router.settings import RouterSettings

router = APIRouter(route_class=ThreadParsedRoute, tags=["tokenizer"],
                   dependencies=[Depends(require_api_key)])


@router.post("/tokenize", response_model=TokenizeResponse,
             responses=error_responses(400, 401, 404, 413, 415), dependencies=[JsonBody])
async def tokenize(body: TokenizeRequest, state: State) -> TokenizeResponse:
    body.log_unknown_fields()
    model = state.model(body.model)
    # Off the event loop, as for generation: a long text takes a while to tokenize.
    return await asyncio.to_thread(_tokenize, body, model, state.settings)


def _tokenize(
    body: TokenizeRequest, model: ServedModel, settings: RouterSettings
) -> TokenizeResponse:
    tok = model.tokenizer
    if isinstance(body, TokenizeChatRequest):
        check_messages(body.messages, settings)
        ids = chat_prompt_ids(tok, body.messages, body.add_generation_prompt,
                              body.continue_final_message, body.add_special_tokens)
    else:
        check_text([body.prompt], settings, "prompt")
        ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    strs = [model.token_text.display(i) for i in ids] if body.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=model.max_model_len, tokens=ids, token_strs=strs
    )


@router.post("/detokenize", response_model=DetokenizeResponse,
             responses=error_responses(400, 401, 404, 413, 415), dependencies=[JsonBody])
async def detokenize(body: DetokenizeRequest, state: State) -> DetokenizeResponse:
    body.log_unknown_fields()
    model = state.model(body.model)
    return await asyncio.to_thread(_detokenize, body, model)


def _detokenize(body: DetokenizeRequest, model: ServedModel) -> DetokenizeResponse:
    check_token_ids(model, body.tokens, "tokens")
    return DetokenizeResponse(prompt=model.tokenizer.decode(body.tokens))


def _token_str(value: Any) -> str | None:
    return None if value is None else str(value)


@router.get("/tokenizer_info", responses=error_responses(401, 404))
async def tokenizer_info(state: State, model: str | None = None) -> dict[str, Any]:
    """The tokenizer's configuration, enough to rebuild the prompt format client-side."""
    served = state.model(model)
    tok = served.tokenizer
    return {
        "model": served.name,
        "tokenizer_class": type(tok).__name__,
        "vocab_size": len(tok),
        "model_max_length": served.max_model_len,
        "max_model_len": served.max_model_len,
        "bos_token": _token_str(tok.bos_token),
        "eos_token": _token_str(tok.eos_token),
        "pad_token": _token_str(tok.pad_token),
        "unk_token": _token_str(tok.unk_token),
        "eos_token_ids": sorted(served.eos_token_ids),
        "added_tokens_decoder": {
            str(i): {"content": t.content, "special": t.special}
            for i, t in tok.added_tokens_decoder.items()
        },
        "chat_template": tok.chat_template,
    }
