"""`tandem generate`: run one prompt through the engine, in process, and print the text.

Only the generated text goes to stdout (streamed as it is produced); logs go to stderr.
Model, dtype and device come from TandemSettings, so TANDEM_MODEL etc. work as well as flags.
"""

from __future__ import annotations

import argparse
import logging
import sys

from engine.engine import Engine, EngineConfig
from engine.loader import load_model
from engine.registry import resolve_model
from engine.sampling_params import SamplingParams
from engine.sequence import SeqRequest
from tandem.flags import add_settings_args, settings_from_args
from tandem.logs import setup_logging
from wire.settings import TandemSettings

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text in process with the engine (no server)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text, fed as is (no chat template)")
    src.add_argument("--chat", help="one user message, through the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None)
    add_settings_args(p, TandemSettings)
    p.set_defaults(func=run)


def prompt_ids(tokenizer, args: argparse.Namespace) -> list[int]:
    if args.chat is not None:
        messages = [{"role": "user", "content": args.chat}]
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    return tokenizer(args.prompt).input_ids


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(TandemSettings, args)
    setup_logging(settings.log_level, role="generate")
    loaded = load_model(resolve_model(settings.model), dtype=settings.dtype,
                        device=settings.device)
    tok = loaded.tokenizer
    ids = prompt_ids(tok, args)
    engine = Engine(loaded, EngineConfig(max_slots=1))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    engine.add(SeqRequest("generate", ids, len(ids), params))
    tokens: list[int] = []
    shown = ""
    reason = None
    while engine.has_work():
        for ev in engine.step():
            tokens.append(ev.token_id)
            reason = ev.finish_reason or reason
        text = tok.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back a half-decoded multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tok.decode(tokens, skip_special_tokens=True)[len(shown):] + "\n")
    log.info("%d prompt tokens, %d generated, finish_reason=%s", len(ids), len(tokens), reason)
    return 0
