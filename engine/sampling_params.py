"""Internal sampling parameters: what each wire request converts itself into, once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(slots=True, frozen=True)
class Guide:
    """A constraint on the generated text, enforced token by token (engine/grammar.py).

    kind "json": `spec` is a JSON Schema (JSON text); "regex": a regular expression the whole
    output must match (Rust regex syntax); "lark": a Lark grammar as llguidance reads it.
    Choices, tool calls and JSON mode are built from these at the HTTP edge.
    """

    kind: Literal["json", "regex", "lark"]
    spec: str


@dataclass(slots=True)
class SamplingParams:
    """Per-sequence decoding controls. Validated at the HTTP edge; trusted here.

    `seed` makes sampling position-deterministic: the token drawn at position p depends only on
    (seed, p, logits), so a sequence resumed elsewhere from its KV continues with the same text.
    The router assigns a random seed when the client gives none, so failover stays exact.
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    presence_penalty: float = 0.0  # over generated tokens (OpenAI semantics)
    frequency_penalty: float = 0.0  # over generated tokens
    repetition_penalty: float = 1.0  # over prompt + generated (HF/vLLM semantics)
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: chosen token + top-k alternatives
    prompt_logprobs: int | None = None  # for echo + logprobs; forces a full prefill
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    guide: Guide | None = None  # structured output: the text must match it

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
