"""Seeded request plans: the same config and seed give byte-identical prompts.

A plan is a tuple of sessions; a session is a sequence of turns that one simulated user sends
one after another (the runner keeps that order and runs sessions concurrently):

    random         N sessions x 1 turn, no prefix
    shared-prefix  U sessions x T turns, each session's own long prefix + an independent question
    multi-turn     U sessions x T turns, each turn sends the whole conversation so far
                   (prefix, earlier questions and the server's earlier answers)

Prompts are words drawn from a fixed list of short common English words, which BPE tokenizers
mostly encode as one token each (with the leading space), so N words is roughly N tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tandem.bench.config import BenchConfig

# Short, common, lowercase words: each is a single token in GPT-2/Llama/Qwen style vocabularies
# when preceded by a space, which keeps prompt token counts close to the requested word counts.
_WORD_TEXT = """
the of and to in is you that it he was for on are as with his they at be this have from or
one had by word but not what all were we when your can said there use an each which she do
how their if will up other about out many then them these so some her would make like him
into time has look two more write go see number no way could people my than first water been
call who oil its now find long down day did get come made may part over new sound take only
little work know place year live me back give most very after thing our just name good man
think say great where help through much before line right too mean old any same tell boy
follow came want show also around form three small set put end does another well large must
big even such because turn here why ask went men read need land different home us move try
kind hand picture again change off play spell air away animal house point page letter mother
answer found study still learn should world high every near add food between own below country
plant last school father keep tree never start city earth eye light thought head under story
"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


@dataclass(slots=True, frozen=True)
class Turn:
    """One request of a session; index is its stable position in the whole plan."""

    index: int
    text: str
    max_tokens: int


@dataclass(slots=True, frozen=True)
class Session:
    """One simulated user: an optional prefix (system message) and turns sent in order."""

    index: int
    prefix: str | None
    turns: tuple[Turn, ...]
    carry_history: bool


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def sample_len(rng: random.Random, mean: int, range_ratio: float) -> int:
    """Uniform in [mean*(1-r), mean*(1+r)], at least 1 (vLLM's --random-range-ratio)."""
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


def _max_tokens(rng: random.Random, cfg: BenchConfig) -> int:
    # Always draw, so --max-tokens does not shift the prompts that follow in the stream.
    sampled = sample_len(rng, cfg.output_len, cfg.range_ratio)
    return cfg.max_tokens if cfg.max_tokens is not None else sampled


def _random_plan(cfg: BenchConfig, rng: random.Random) -> tuple[Session, ...]:
    sessions = []
    for i in range(cfg.num_requests):
        text = words(rng, sample_len(rng, cfg.input_len, cfg.range_ratio))
        turn = Turn(index=i, text=text, max_tokens=_max_tokens(rng, cfg))
        sessions.append(Session(index=i, prefix=None, turns=(turn,), carry_history=False))
    return tuple(sessions)


def _session_plan(cfg: BenchConfig, rng: random.Random) -> tuple[Session, ...]:
    """Users x turns, numbered turn-major and cut at --num-requests.

    Turn-major numbering (turn 0 of every user, then turn 1, ...) means a small request budget
    still exercises every user's cold prefix before any warm follow-up.
    """
    users = []
    for u in range(cfg.num_users):
        prefix = f"Document {u}: {words(rng, cfg.prefix_len)}" if cfg.prefix_len else None
        questions = [
            (f"Question {t}: {words(rng, sample_len(rng, cfg.input_len, cfg.range_ratio))}?",
             _max_tokens(rng, cfg))
            for t in range(cfg.turns)
        ]
        users.append((prefix, questions))
    sessions = []
    for u, (prefix, questions) in enumerate(users):
        turns = tuple(
            Turn(index=t * cfg.num_users + u, text=text, max_tokens=max_tokens)
            for t, (text, max_tokens) in enumerate(questions)
            if t * cfg.num_users + u < cfg.num_requests
        )
        if turns:
            sessions.append(Session(index=u, prefix=prefix, turns=turns,
                                    carry_history=cfg.workload == "multi-turn"))
    return tuple(sessions)


def build_plan(cfg: BenchConfig) -> tuple[Session, ...]:
    """The whole workload, generated up front from cfg.seed alone."""
    rng = random.Random(cfg.seed)
    if cfg.workload == "random":
        return _random_plan(cfg, rng)
    return _session_plan(cfg, rng)


def plan_size(plan: tuple[Session, ...]) -> int:
    return sum(len(s.turns) for s in plan)


def arrival_delays(n: int, rate: float | None, seed: int) -> list[float]:
    """Start offsets (seconds) of n sessions: Poisson arrivals at `rate`/s, or all at 0.

    Uses its own generator so the arrival schedule never changes the prompts.
    """
    if rate is None:
        return [0.0] * n
    rng = random.Random(f"arrivals-{seed}")
    delays, t = [], 0.0
    for _ in range(n):
        delays.append(t)
        t += rng.expovariate(rate)
    return delays


@dataclass(slots=True)
class Conversation:
    """The messages a session has sent and received so far; owned by one session task."""

    messages: list[dict[str, str]]

    @classmethod
    def start(cls, session: Session) -> Conversation:
        return cls([{"role": "system", "content": session.prefix}] if session.prefix else [])

    def with_question(self, text: str) -> list[dict[str, str]]:
        return [*self.messages, {"role": "user", "content": text}]

    def record_turn(self, question: str, answer: str) -> None:
        self.messages += [{"role": "user", "content": question},
                          {"role": "assistant", "content": answer}]


def render_prompt(messages: list[dict[str, str]]) -> str:
    """Plain-text transcript for /v1/completions, ending where the assistant should answer."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*lines, "Assistant:"])


def count_words(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"].split()) for m in messages)
