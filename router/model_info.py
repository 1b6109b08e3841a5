"""What the router knows about a served model: its tokenizer and limits, never its weights."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from engine.grammar import Grammars
from engine.loader import materialize
from engine.registry import resolve_model
from router.output.token_text import TokenText
from router.settings import MAX_INFERRED_MODEL_LEN, RouterSettings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServedModel:
    name: str  # what clients put in `model`
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int  # prompt + completion tokens
    eos_token_ids: frozenset[int]
    created: int  # unix seconds, for /v1/models
    vocab_size: int = 0  # valid token ids are [0, vocab_size); 0: len(tokenizer)
    root: str = ""  # the model id or folder it came from
    token_text: TokenText = field(init=False)
    grammars: Grammars = field(init=False)  # structured output: guides checked at the door

    def __post_init__(self) -> None:
        self.vocab_size = self.vocab_size or len(self.tokenizer)
        self.token_text = TokenText(self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)


def _as_ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def _eos_ids(folder: Path | str, config, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """EOS from the model config, generation config and tokenizer: chat models often list
    several (end-of-turn and end-of-text), and any of them ends a choice."""
    ids = _as_ids(getattr(config, "eos_token_id", None)) | _as_ids(tokenizer.eos_token_id)
    # No generation_config.json is fine: the config and tokenizer are enough.
    with contextlib.suppress(OSError):
        ids |= _as_ids(GenerationConfig.from_pretrained(folder).eos_token_id)
    return frozenset(ids)


def load_served_model(
    model: str, served_name: str | None = None, max_model_len: int | None = None
) -> ServedModel:
    """Tokenizer + config only (cheap). Limits come from the config unless given."""
    folder = materialize(resolve_model(model))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    text_config = getattr(config, "get_text_config", lambda: config)()
    inferred = getattr(text_config, "max_position_embeddings", None) or MAX_INFERRED_MODEL_LEN
    length = max_model_len or min(inferred, MAX_INFERRED_MODEL_LEN)
    vocab = max(getattr(text_config, "vocab_size", 0) or 0, len(tokenizer))
    served = ServedModel(
        name=served_name or model,
        tokenizer=tokenizer,
        max_model_len=length,
        eos_token_ids=_eos_ids(folder, text_config, tokenizer),
        created=int(time.time()),
        vocab_size=vocab,
        root=model,
    )
    log.info("serving %s as %r (max_model_len %d)", model, served.name, length)
    return served


def load_from_settings(settings: RouterSettings) -> list[ServedModel]:
    """Every served model, the default first."""
    return [load_served_model(model, name, settings.max_model_len)
            for model, name in settings.served_models().items()]
