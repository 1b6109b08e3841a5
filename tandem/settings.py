"""Settings plumbing: one pydantic-settings object per process, from env, `.env` and CLI flags.

Every field `foo_bar` of a settings class is the env var `TANDEM_FOO_BAR` and the flag
`--foo-bar`. Precedence: flag > env > `.env` > default.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.registry import DEFAULT_MODEL

S = TypeVar("S", bound=BaseSettings)


class TandemSettings(BaseSettings):
    """Fields every model-loading process shares."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_", env_file=".env", extra="ignore")

    model: str = DEFAULT_MODEL
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_args(
    parser: argparse.ArgumentParser, cls: type[BaseSettings], skip: set[str] = frozenset()
) -> None:
    """One flag per settings field; unset flags stay None so env/.env/defaults apply."""
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        ann = field.annotation
        where = f"(env TANDEM_{name.upper()}, default {field.default!r})"
        help_text = f"{field.description} {where}" if field.description else where
        if ann is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
            continue
        flags = [_flag(name), *((field.json_schema_extra or {}).get("cli_aliases", []))]
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if get_origin(ann) is Literal:
            kwargs["choices"] = list(get_args(ann))
        elif ann in (int, float):
            kwargs["type"] = ann
        elif get_origin(ann) is list:
            kwargs["action"] = "append"
        parser.add_argument(*flags, **kwargs)


def settings_from_args(cls: type[S], args: argparse.Namespace) -> S:
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
    return cls(**given)
