"""Logprobs in the two wire formats.

Completions (legacy), one list entry per token, prompt tokens first when echoing:
    {"tokens": [str], "token_logprobs": [float|None], "top_logprobs": [{str: float}|None],
     "text_offset": [int]}          (the first prompt token has no logprob: None)
    top_logprobs holds the k best plus the chosen token (so up to k+1 entries), as OpenAI does.
Chat:
    {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
"""

from __future__ import annotations

from collections.abc import Sequence

from router.model_info import ServedModel
from router.output.detokenizer import make_detokenizer
from router.output.generation import PromptLogprobs, TokenLogprob, finite_logprob
from router.output.token_text import TokenText
from router.protocol.chat import ChatLogprobs, TokenLogprobOut, TopLogprob
from router.protocol.completions import CompletionLogprobs


def _top_dict(tt: TokenText, chosen: int, logprob: float, top: Sequence[tuple[int, float]],
              k: int) -> dict[str, float]:
    out = {tt.display(t): finite_logprob(lp) for t, lp in list(top)[:k]}
    out.setdefault(tt.display(chosen), logprob)
    return out


def completion_logprobs(
    model: ServedModel, entries: Sequence[TokenLogprob], k: int, base_offset: int = 0
) -> CompletionLogprobs:
    tt = model.token_text
    return CompletionLogprobs(
        tokens=[tt.display(e.token_id) for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[_top_dict(tt, e.token_id, e.logprob, e.top, k) for e in entries],
        text_offset=[base_offset + e.offset for e in entries],
    )


def echo_logprobs(
    model: ServedModel,
    prompt_ids: Sequence[int],
    prompt_logprobs: PromptLogprobs | None,
    k: int,
    skip_special_tokens: bool = True,
) -> CompletionLogprobs:
    """The prompt's own tokens, scored (lm-eval's loglikelihood reads these)."""
    tt = model.token_text
    detok = make_detokenizer(model.tokenizer, (), skip_special_tokens)
    out = CompletionLogprobs()
    scores = list(prompt_logprobs or [])
    for i, token_id in enumerate(prompt_ids):
        out.tokens.append(tt.display(token_id))
        out.text_offset.append(detok.text_len)
        detok.push(token_id)
        score = scores[i] if i < len(scores) else None
        if score is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        logprob = finite_logprob(score[0])
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(_top_dict(tt, token_id, logprob, score[1], k))
    return out


def join_completion_logprobs(parts: Sequence[CompletionLogprobs]) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for p in parts:
        out.tokens += p.tokens
        out.token_logprobs += p.token_logprobs
        out.top_logprobs += p.top_logprobs
        out.text_offset += p.text_offset
    return out


def _top_entry(tt: TokenText, token_id: int, logprob: float) -> TopLogprob:
    return TopLogprob(
        token=tt.display(token_id),
        logprob=finite_logprob(logprob),
        bytes=list(tt.token_bytes(token_id)),
    )


def chat_logprobs(model: ServedModel, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    tt = model.token_text
    return ChatLogprobs(content=[
        TokenLogprobOut(
            token=tt.display(e.token_id),
            logprob=e.logprob,
            bytes=list(tt.token_bytes(e.token_id)),
            top_logprobs=[_top_entry(tt, t, lp) for t, lp in e.top],
        )
        for e in entries
    ])
