"""The router process's settings: `TANDEM_*` env vars, `.env` and `--flags` onto one object."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from wire.settings import StoreSettings

# Never infer a context longer than this from the model config: SmolLM2 says 8192 and bigger
# models say 128k+, which no worker here is sized for. An explicit --max-model-len overrides it.
MAX_INFERRED_MODEL_LEN = 8192


def _split_list(value: Any) -> Any:
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
    served_model_name: str | None = Field(
        None, description="the name clients use in `model` (default: the model id)"
    )
    # NoDecode: we parse the env var ourselves so both "k1,k2" and '["k1","k2"]' work.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted bearer keys (env TANDEM_API_KEYS: comma-separated or JSON list; "
        "flag --api-key, repeatable); empty means no auth",
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
        120.0, gt=0, description="a worker silent this long mid-request counts as failed"
    )
    max_failovers: int = Field(2, ge=0, description="retries on another worker per request")
    local_prefill_tokens: int = Field(
        256, ge=0, description="a prompt with fewer uncached tokens than this is prefilled by "
        "its decode worker (no prefill hop, no KV round trip through the store); 0: every "
        "prompt with an uncached token goes to a prefill worker"
    )
    internal_token: str | None = Field(None, description="shared secret for worker APIs")

    @field_validator("api_keys", "prefill_urls", "decode_urls", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _split_list(value)
