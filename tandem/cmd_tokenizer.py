"""`tandem tokenizer` (stub, filled in by its owner)."""

from __future__ import annotations


def register(sub) -> None:
    """Adds no subcommand yet."""
