"""CLI flags for settings classes: every field `foo_bar` is the flag `--foo-bar`.

Unset flags stay None, so env (`TANDEM_FOO_BAR`), `.env` and defaults apply below them.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


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
        default = field.get_default(call_default_factory=True)
        where = f"(env TANDEM_{name.upper()}, default {default!r})"
        help_text = f"{field.description} {where}" if field.description else where
        if ann in (bool, bool | None):  # None: the setting's own default (e.g. "auto")
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
