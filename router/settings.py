"""The router process's settings: `TANDEM_*` env vars, `.env` and `--flags` onto one object."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from engine.registry import DEFAULT_MODEL
from router.protocol.common import (
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_N,
    MAX_PROMPTS,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
)
from router.protocol.dag import MAX_DAG_NODES
from wire.settings import StoreSettings
from workflow.dag import DEFAULT_MAX_NODES

# Never infer a context longer than this from the model config: SmolLM2 says 8192 and bigger
# models say 128k+, which no worker here is sized for. An explicit --max-model-len overrides it.
MAX_INFERRED_MODEL_LEN = 8192


def split_list(value: Any) -> Any:
    """"a,b", '["a","b"]' or a repeated flag's list (each item may hold commas) -> list."""
    if isinstance(value, str) and value.strip().startswith("["):
        return json.loads(value)
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        items = [k.strip() for item in value for k in str(item).split(",")]
        return [k for k in items if k]
    return value


class RouterSettings(StoreSettings):
    """The OpenAI API front end plus worker dispatch. Store fields serve the prefix lookup."""

    host: str = Field("127.0.0.1", description="bind address (loopback unless asked otherwise)")
    port: int = Field(8000, description="HTTP port")
    # NoDecode: "a,b" in the env as well as a repeated --model flag.
    model: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_MODEL],
        description="the models served (repeat the flag, or comma-separate): each is its own "
        "`model` name, served by the workers that report it; the first is the default",
    )
    served_model_name: str | None = Field(
        None, description="the name clients use in `model` (default: the model id); only "
        "with one model"
    )
    # NoDecode: we parse the env var ourselves so both "k1,k2" and '["k1","k2"]' work.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted bearer keys, each `key` or `tenant:key` (env TANDEM_API_KEYS: "
        "comma-separated or JSON list; flag --api-key, repeatable); empty means no auth; a "
        "tenant (for a plain key, a hash of it) is its own prefix-cache namespace",
        json_schema_extra={"cli_aliases": ["--api-key"]},
    )
    max_model_len: int | None = Field(
        None, ge=1, description=f"context window (default: model config, capped at "
        f"{MAX_INFERRED_MODEL_LEN})"
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="give up on a request when the backend is silent this long"
    )
    max_log_len: int | None = Field(
        None, ge=0, description="characters of each prompt logged at debug (default: all)"
    )

    prefill_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="prefill workers' base URLs, comma-separated; none: decode workers prefill",
    )
    decode_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:8200"],
        description="decode workers' base URLs, comma-separated (a DNS name with several "
        "addresses counts as one worker per address)",
    )
    health_interval_s: float = Field(1.0, gt=0, description="seconds between worker probes")
    worker_timeout_s: float = Field(
        120.0, gt=0, description="a worker silent this long mid-request counts as failed (a "
        "worker's reply sends a blank line after stream_keepalive_s of nothing else, queued "
        "or computing)"
    )
    max_failovers: int = Field(2, ge=0, description="retries on another worker per request")
    local_prefill_tokens: int = Field(
        256, ge=0, description="a prompt with fewer uncached tokens than this is prefilled by "
        "its decode worker (no prefill hop, no KV round trip through the store); 0: every "
        "prompt with an uncached token goes to a prefill worker"
    )
    # KV-aware routing (router/dispatch/kv_route.py); the defaults are measured in
    # docs/BENCHMARKS.md ("KV-aware routing").
    route_policy: Literal["kv", "least_loaded"] = Field(
        "kv", description="kv: send a request where its prefix is resident on the device, "
        "weighed against load; least_loaded: fewest requests in flight"
    )
    route_load_tokens: int = Field(
        64, ge=0, description="kv routing: prompt tokens one request in flight is worth"
    )
    route_balance_abs: int = Field(
        8, ge=0, description="kv routing: when workers' in-flight counts differ by more than "
        "this, the least loaded wins whatever it holds"
    )

    # --- what one request may ask (docs/OPERATIONS.md#limits) ----------------------------------
    # A max-context prompt sent as token ids is ~50-100 KB of JSON (8192 ids of up to 6 digits
    # plus commas), and as text ~40 KB of English: 8 MiB leaves room for any honest request,
    # batches included, while it bounds what the router buffers and parses on its event loop.
    max_body_bytes: int = Field(
        8 * 2**20, ge=1024, description="request body bytes; a larger body is refused (413) "
        "as soon as this much has arrived"
    )
    # Tokenizing runs at ~400K chars/s per core; a full 8192-token context is ~40K chars of
    # English (a run of spaces packs up to 64 chars per token).
    max_text_chars: int = Field(
        2**20, ge=1, description="characters of text one request sends for tokenizing (every "
        "prompt string, or every message's content, summed)"
    )
    # The `le=` bounds are the request schema's own caps: a setting only ever lowers them.
    max_prompts: int = Field(
        MAX_PROMPTS, ge=1, le=MAX_PROMPTS, description="prompts in one /v1/completions request"
    )
    max_n: int = Field(MAX_N, ge=1, le=MAX_N, description="choices per prompt (`n`)")
    max_choices: int = Field(
        2048, ge=1, description="backend calls one request fans out into (prompts x n)"
    )
    max_request_tokens: int = Field(
        2**20, ge=1, description="tokens one request may cause: the sum over its choices of "
        "prompt + max_tokens (128 choices of a full 8192-token context)"
    )
    max_stop_strings: int = Field(
        MAX_STOP_STRINGS, ge=0, le=MAX_STOP_STRINGS, description="stop strings per request"
    )
    max_stop_chars: int = Field(
        256, ge=1, description="characters in one stop string (each streamed token is "
        "matched against every prefix of it)"
    )
    max_logit_bias: int = Field(
        MAX_LOGIT_BIAS, ge=0, le=MAX_LOGIT_BIAS,
        description="`logit_bias` entries (applied on every sampling step)",
    )
    max_logprobs: int = Field(
        MAX_TOP_LOGPROBS, ge=0, le=MAX_TOP_LOGPROBS,
        description="alternatives per token (`logprobs`, `top_logprobs`)",
    )
    max_messages: int = Field(
        MAX_MESSAGES, ge=1, le=MAX_MESSAGES, description="messages in one chat request"
    )

    # --- backpressure (docs/RELIABILITY.md#backpressure) ---------------------------------------
    # A fixed bound rather than the workers' advertised capacity, which changes as they come
    # and go: 512 is 4 n=128 requests, or 16 full decode workers (32 slots each), at once.
    max_inflight_choices: int = Field(
        512, ge=1, description="backend calls (choices) open at once across the router; a "
        "request whose choices would pass it gets 429 before any worker call"
    )
    # Each open choice holds one connection to a worker (its prefill's closes before its
    # decode opens), so twice the in-flight bound leaves room for keep-alive churn.
    worker_max_connections: int = Field(
        1024, ge=1, description="connections the router keeps to all workers together; a "
        "call that finds none free is refused (tried elsewhere or 429), not a worker failure"
    )
    # A call of n choices takes n of a worker's admission units (max_slots + max_queue, 96 by
    # default) and one prompt computation: 16 keeps a call well inside one worker.
    choices_per_call: int = Field(
        16, ge=1, description="choices of one prompt (n > 1) that share one worker call: the "
        "prompt is computed once per call and forked (a larger n is split into calls)"
    )
    stream_send_timeout_s: float = Field(
        30.0, gt=0, description="a streaming client that accepts no chunk for this long is "
        "cut off and its backend calls closed (a reader that stopped reading)"
    )

    # --- DAGs (POST /v1/dag) ----------------------------------------------------------------
    dag_max_nodes: int = Field(
        DEFAULT_MAX_NODES, ge=1, le=MAX_DAG_NODES, description="nodes in one /v1/dag request"
    )
    # Each running node holds one unit of max_inflight_choices; 8 lets a wide DAG fill a
    # worker's batch without one DAG taking the router's whole bound.
    dag_max_concurrency: int = Field(
        8, ge=1, description="nodes of one DAG running at once (a request may ask for fewer)"
    )

    @field_validator("model", "api_keys", "prefill_urls", "decode_urls", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_list(value)

    @model_validator(mode="after")
    def _check_models(self) -> RouterSettings:
        if not self.model or len(set(self.model)) != len(self.model):
            raise ValueError(f"--model needs distinct models, at least one; got {self.model}")
        if self.served_model_name and len(self.model) > 1:
            raise ValueError("--served-model-name names one model; with several, each is "
                             "served under its own name")
        return self

    def served_models(self) -> dict[str, str]:
        """What each worker's `--model` is called in requests (the first is the default)."""
        if self.served_model_name:
            return {self.model[0]: self.served_model_name}
        return {m: m for m in self.model}

    # --- tenants (docs/OPERATIONS.md#tenants) ---------------------------------------------------
    report_cached_tokens: bool = Field(
        True, description="report `usage.prompt_tokens_details.cached_tokens`; false reports 0 "
        "(how much of a prompt was cached says something about what was sent before)"
    )
