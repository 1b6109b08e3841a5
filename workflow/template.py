"""`{{node_id}}` references in a DAG node's prompt: find them, and fill them in.

This is deliberately not a template engine. The only construct is `{{id}}` (spaces inside the
braces allowed), replaced by that node's output text; there are no expressions, filters,
attribute lookups or loops, so nothing a client writes is ever evaluated. Any other `{{...}}`,
and any `{%`/`{#` (Jinja's statement and comment markers, which a prompt meant for a Jinja
engine would use) is refused, so a prompt written for another templating system fails loudly
instead of being sent with its markers in it.

Filling in is one pass over the original text: an output that itself contains `{{other}}` is
inserted as plain text and never expanded, so one node's output cannot pull in another's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

NODE_ID = r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}"
NODE_ID_PATTERN = re.compile(rf"^{NODE_ID}$")
_REFERENCE = re.compile(r"\{\{\s*(" + NODE_ID + r")\s*\}\}")
_MARKER = re.compile(r"\{\{|\{%|\{#")


class TemplateError(ValueError):
    """The text holds a `{{`, `{%` or `{#` that is not a plain `{{node_id}}` reference."""


def references(text: str) -> list[str]:
    """The node ids `text` refers to, in order of first appearance. Raises TemplateError on
    any marker that is not a reference."""
    found: list[str] = []
    pos = 0
    while (marker := _MARKER.search(text, pos)) is not None:
        ref = _REFERENCE.match(text, marker.start())
        if ref is None:
            snippet = text[marker.start(): marker.start() + 40]
            raise TemplateError(
                f"only `{{{{node_id}}}}` references are allowed in a prompt; found {snippet!r}")
        if ref.group(1) not in found:
            found.append(ref.group(1))
        pos = ref.end()
    return found


def render(text: str, outputs: Mapping[str, str], max_chars: int | None = None) -> str:
    """`text` with every reference replaced by its node's output (all must be in `outputs`).
    The size is checked before anything is built: a prompt holding 100k references to one
    long output would otherwise build gigabytes of text first. Raises TemplateError when it
    would pass `max_chars`."""
    if max_chars is not None:
        size = len(text) + sum(len(outputs[m.group(1)]) - len(m.group(0))
                               for m in _REFERENCE.finditer(text))
        if size > max_chars:
            raise TemplateError(f"filled in, the prompt would hold {size} characters; at most "
                                f"{max_chars} are allowed")
    return _REFERENCE.sub(lambda m: outputs[m.group(1)], text)
