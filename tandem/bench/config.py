"""The benchmark's configuration: validated once from the CLI, then trusted everywhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Workload = Literal["random", "shared-prefix", "multi-turn"]
Endpoint = Literal["chat", "completions"]
WORKLOADS: tuple[str, ...] = ("random", "shared-prefix", "multi-turn")
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
SLO_METRICS = ("ttft", "tpot", "e2e")


class BenchError(Exception):
    """A problem the user can fix (bad flag, unreachable server); printed without a traceback."""


@dataclass(slots=True)
class BenchConfig:
    """Everything that determines a run; written verbatim into the JSON output."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    api_key: str | None = None
    endpoint: Endpoint = "chat"
    workload: Workload = "random"
    seed: int = 0
    num_requests: int = 100
    max_duration_s: float = 600.0
    concurrency: list[int] = field(default_factory=lambda: [1])
    request_rate: float | None = None
    input_len: int = 256
    output_len: int = 64
    range_ratio: float = 0.0
    max_tokens: int | None = None
    prefix_len: int = 1024
    num_users: int = 8
    turns: int = 4
    temperature: float = 0.0
    ignore_eos: bool = False
    timeout_s: float = 300.0
    slo: dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return ENDPOINT_PATHS[self.endpoint]

    def validate(self) -> None:
        """Raises ValueError with a user-facing message for the first bad value."""
        checks = [
            (self.num_requests >= 1, "--num-requests must be >= 1"),
            (self.max_duration_s > 0, "--max-duration-s must be > 0"),
            (bool(self.concurrency) and min(self.concurrency) >= 1, "--concurrency must be >= 1"),
            (self.request_rate is None or self.request_rate > 0, "--request-rate must be > 0"),
            (self.input_len >= 1 and self.output_len >= 1, "--input-len/--output-len must be >= 1"),
            (0.0 <= self.range_ratio < 1.0, "--range-ratio must be in [0, 1)"),
            (self.max_tokens is None or self.max_tokens >= 1, "--max-tokens must be >= 1"),
            (self.prefix_len >= 0, "--prefix-len must be >= 0"),
            (self.num_users >= 1 and self.turns >= 1, "--num-users/--turns must be >= 1"),
            (self.timeout_s > 0, "--timeout-s must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def parse_concurrency(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]: one run per level, in the given order."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--concurrency: expected integers like 1,4,16, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency: levels must be >= 1, got {text!r}")
    return levels


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=0.5,tpot=0.05' -> {'ttft': 0.5, 'tpot': 0.05}; values in seconds."""
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--slo: expected NAME=SECONDS, NAME one of {SLO_METRICS}, "
                             f"got {part!r}")
        try:
            slo[name] = float(value)
        except ValueError:
            raise ValueError(f"--slo: {name} needs a number of seconds, got {value!r}") from None
        if slo[name] <= 0:
            raise ValueError(f"--slo: {name} must be > 0")
    return slo
