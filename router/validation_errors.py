"""Turn pydantic's error list into one OpenAI-style message + `param` path.

pydantic locates errors inside unions with branch tags (`("prompt", "list[str]", 0)`); clients
want the field path (`prompt.0`). We report one error: the most specific one under the first
field that failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_LOCATIONS = {"body", "query", "path", "header", "cookie"}
_PRIMITIVES = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}
_TAG_CHARS = set("[]()-,'")


def _is_tag(part: Any) -> bool:
    """A union-branch or validator tag rather than a field name, index or dict key."""
    if not isinstance(part, str):
        return False
    return part in _PRIMITIVES or bool(_TAG_CHARS & set(part)) or part[:1].isupper()


def clean_loc(loc: Sequence[Any]) -> list[Any]:
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return [p for p in parts if not _is_tag(p)]


def _param(loc: Sequence[Any]) -> str | None:
    return ".".join(str(p) for p in clean_loc(loc)) or None


def _code(error_type: str) -> str:
    if error_type == "missing":
        return "missing_required_parameter"
    if error_type.endswith(("_type", "_parsing")):
        return "invalid_type"
    return "invalid_value"


def _body_level(error: dict[str, Any]) -> tuple[str, str | None, str] | None:
    """Errors about the body as a whole: absent, not JSON, not an object."""
    if error["type"] == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"The request body is not valid JSON: {detail}.", None, "invalid_json"
    if clean_loc(error["loc"]):
        return None
    if error["type"] == "missing":
        return "A JSON request body is required.", None, "missing_body"
    return "The request body must be a JSON object.", None, "invalid_type"


def _pick(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The most specific error under the first failing field: a constraint beats a type
    mismatch (it means the value matched some union branch), then the longest path wins."""
    top = clean_loc(errors[0]["loc"])[:1]
    group = [e for e in errors if clean_loc(e["loc"])[:1] == top]
    constraint = [e for e in group if not e["type"].endswith("_type")]
    pool = constraint or group
    return max(pool, key=lambda e: len(e["loc"]))


def _union_branches(errors: Sequence[dict[str, Any]], chosen: dict[str, Any]) -> list[str]:
    """Branch names when `chosen` failed at the union level itself (a plain type mismatch)."""
    if not chosen["loc"] or not _is_tag(chosen["loc"][-1]):
        return []
    path = clean_loc(chosen["loc"])
    tags = [
        e["loc"][-1] for e in errors
        if e["loc"] and _is_tag(e["loc"][-1]) and clean_loc(e["loc"]) == path
    ]
    return [t.replace("constrained-", "") for t in tags] if len(tags) > 1 else []


def describe_validation_error(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None, str]:
    """(message, param, code) for a RequestValidationError's `errors()`."""
    if not errors:
        return "Invalid request.", None, "invalid_value"
    body = _body_level(errors[0])
    if body:
        return body
    chosen = _pick(errors)
    param = _param(chosen["loc"])
    if chosen["type"] == "missing":
        return f"Missing required parameter: `{param}`.", param, _code("missing")
    branches = _union_branches(errors, chosen)
    if branches:
        return (
            f"Invalid type for `{param}`: expected one of {', '.join(branches)}.",
            param, "invalid_type",
        )
    msg = str(chosen.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"Invalid value for `{param}`: {msg}.", param, _code(chosen["type"])
