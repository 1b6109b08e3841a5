"""What one benchmark request measured; the unit every statistic is computed from."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class RequestRecord:
    """Timings (seconds, time.perf_counter) and token counts of one streamed request.

    start_s is relative to the start of its run. ttft_s, e2e_s and itl_s are relative to the
    moment the request was sent. Token counts come from the server's `usage` when it sent one
    (`usage_reported`); otherwise completion_tokens counts streamed content chunks and
    prompt_tokens stays 0.
    """

    index: int
    session: int
    turn: int
    prompt_words: int
    max_tokens: int
    start_s: float = 0.0
    ok: bool = False
    status_code: int | None = None
    error: str | None = None
    response_id: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    content_chunks: int = 0
    output_chars: int = 0
    finish_reason: str | None = None
    usage_reported: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; 0 when there was at most one token.

        A one-token answer has no decode phase, so it meets any TPOT target (as in vLLM).
        """
        if self.ttft_s is None or self.e2e_s is None:
            return None
        if self.completion_tokens <= 1:
            return 0.0
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"tpot_s": self.tpot_s}
