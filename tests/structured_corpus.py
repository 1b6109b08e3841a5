"""A fixed corpus of JSON Schemas for structured-output validity checks (engine tests, the e2e
stack and scripts/bench_structured.py): seeded, so every run and every box sees the same 200.

They cover what clients send: objects with required and optional properties, nesting, arrays,
enums, const, string length and pattern bounds, integer and number ranges, booleans, null and
anyOf. Sizes are bounded (strings, arrays, depth, a number's fraction digits through
multipleOf) so a complete answer fits in MAX_TOKENS, as a schema with unbounded strings, arrays
or numbers cannot promise: a small model may fill them until max_tokens (greedy SmolLM2 wrote
`10.000...` for a bare `"type": "number"`), which no grammar engine prevents.
"""

from __future__ import annotations

import random
from typing import Any

NUM_SCHEMAS = 200
MAX_TOKENS = 320
WORDS = ["name", "age", "city", "tags", "score", "active", "id", "title", "items", "color",
         "size", "count", "owner", "kind", "note", "level", "price", "email", "code", "rank"]


def corpus(n: int = NUM_SCHEMAS, seed: int = 2026) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [_object(rng, depth=0) for _ in range(n)]


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    names = rng.sample(WORDS, rng.randint(1, 4 if depth == 0 else 3))
    props = {name: _value(rng, depth + 1) for name in names}
    required = [n for n in names if rng.random() < 0.8] or names[:1]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = ["string", "integer", "number", "boolean", "enum", "pattern", "const", "null",
             "anyof"]
    if depth < 3:
        kinds += ["array", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 16)}
    if kind == "integer":
        lo = rng.randint(-100, 100)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
    if kind == "number":
        # multipleOf bounds the fraction's digits (module docstring). Binary-exact steps:
        # jsonschema checks multipleOf in floats, and calls 19.99 no multiple of 0.01.
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000]),
                "multipleOf": rng.choice([0.25, 0.5])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", 1, 2, True], 3)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(
            [r"^[a-z]{2,8}$", r"^[A-Z]{3}-[0-9]{3}$", r"^\d{4}-\d{2}-\d{2}$"])}
    if kind == "const":
        return {"const": rng.choice(["v1", 42, False])}
    if kind == "null":
        return {"type": "null"}
    if kind == "anyof":
        return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                          {"type": "string", "maxLength": 8}]}
    if kind == "array":
        return {"type": "array", "items": _value(rng, depth + 1),
                "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
    return _object(rng, depth)
