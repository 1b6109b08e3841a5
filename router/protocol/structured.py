"""Structured output on the wire: OpenAI's `response_format`, vLLM's `guided_*` fields and its
newer `structured_outputs` object, and their one conversion into the engine's Guide.

Every form becomes one Guide (JSON Schema, regex or Lark); a request may carry one form only.
Whether the guide compiles is checked once the model is known (router/api/guided.py).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from llguidance.gbnf_to_lark import gbnf_to_lark
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictStr, Tag

from engine.sampling_params import Guide
from router.errors import bad_request
from router.protocol.common import Text

# A schema or grammar is compiled per request (cached by its text): its size bounds that work.
MAX_GUIDE_CHARS = 64 * 1024
MAX_CHOICES = 256
# JSON mode: any JSON object (OpenAI's json_object, vLLM's json_object).
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# What GBNF (llama.cpp, xgrammar) writes and Lark does not: guided_grammar takes either.
_GBNF_MARK = "::="

Schema = Annotated[dict[str, Any], Field(description="a JSON Schema")]
Choices = Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)]
# vLLM's guided_* fields, as both requests declare them.
GuidedJson = Annotated[Schema | StrictStr | None, Field(description="a JSON Schema (or its text)")]
GuidedRegex = Annotated[Text | None, Field(description="the output matches it in full")]
GuidedChoice = Annotated[Choices | None, Field(description="the output is one of these")]
GuidedGrammar = Annotated[Text | None, Field(description="a Lark or GBNF grammar")]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    name: StrictStr = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: StrictStr | None = None
    schema_: Schema | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


def _format_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"format-{kind}" if kind in ("text", "json_object", "json_schema") else "format-text"


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("format-text")]
    | Annotated[JsonObjectFormat, Tag("format-json_object")]
    | Annotated[JsonSchemaFormat, Tag("format-json_schema")],
    Discriminator(_format_kind),
]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of its fields. Unknown ones (vLLM's
    `structural_tag`, `whitespace_pattern`) are refused, not ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")

    json_: Schema | StrictStr | None = Field(None, alias="json")
    regex: Text | None = None
    choice: Choices | None = None
    grammar: Text | None = None
    json_object: StrictBool | None = None


def json_guide(schema: dict[str, Any] | str, param: str) -> Guide:
    try:  # a hostile schema nests deeper than Python's recursion limit: a 400, never a 500
        text = schema if isinstance(schema, str) else json.dumps(schema)
        guide = _sized(Guide("json", text), param)
        if isinstance(schema, str) and not isinstance(json.loads(schema), dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise bad_request("The schema must be a JSON object (nested at most a few hundred "
                          "levels).", param) from None
    return guide


def regex_escape(text: str) -> str:
    """Escape a literal for llguidance's (Rust) regex syntax. Python's re.escape also escapes
    spaces, which Rust's parser refuses outside verbose mode."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~" else c for c in text)


def choice_guide(choices: list[str], param: str) -> Guide:
    return _sized(Guide("regex", "(" + "|".join(regex_escape(c) for c in choices) + ")"), param)


def grammar_guide(grammar: str, param: str) -> Guide:
    if _GBNF_MARK in grammar:
        try:
            grammar = gbnf_to_lark(grammar)
        except Exception as exc:  # its parser raises plain Exceptions on bad input
            raise bad_request(f"The GBNF grammar does not parse: {exc}", param) from None
    return _sized(Guide("lark", grammar), param)


def _sized(guide: Guide, param: str) -> Guide:
    if len(guide.spec) > MAX_GUIDE_CHARS:
        raise bad_request(f"The {param} is {len(guide.spec)} characters; at most "
                          f"{MAX_GUIDE_CHARS} are allowed.", param)
    return guide


class _Guided:
    """Reads the structured-output fields both requests declare (`response_format`,
    `guided_*`, `structured_outputs`) into at most one Guide."""

    def guide(self) -> tuple[str, Guide] | None:
        """(the field it came from, the guide), or None without a constraint. Builds the
        schema text: call it once per request."""
        found = [g for g in self._guides() if g is not None]
        if len(found) > 1:
            raise bad_request("Give one structured-output constraint: response_format, "
                              "structured_outputs or one guided_* field.", found[1][0])
        return found[0] if found else None

    def _guides(self):
        r: Any = self
        yield _from_format(r.response_format)
        for kind in _KINDS:
            value = getattr(r, f"guided_{kind}")
            if value is not None:
                yield f"guided_{kind}", _guide_of(kind, value, f"guided_{kind}")
        yield _from_structured(r.structured_outputs)


_KINDS = ("json", "regex", "choice", "grammar")  # vLLM's guided_<kind>, structured_outputs.<kind>


def _guide_of(kind: str, value: Any, param: str) -> Guide:
    if kind == "json":
        return json_guide(value, param)
    if kind == "regex":
        return _sized(Guide("regex", value), param)
    if kind == "choice":
        return choice_guide(value, param)
    return grammar_guide(value, param)


def _from_format(fmt: Any) -> tuple[str, Guide] | None:
    if isinstance(fmt, JsonObjectFormat):
        return "response_format", Guide("json", JSON_OBJECT_SCHEMA)
    if isinstance(fmt, JsonSchemaFormat):
        schema = fmt.json_schema.schema_
        return "response_format", json_guide(schema if schema is not None else {},
                                             "response_format.json_schema.schema")
    return None


def _from_structured(so: StructuredOutputs | None) -> tuple[str, Guide] | None:
    if so is None:
        return None
    given = {kind: v for kind in _KINDS
             if (v := getattr(so, "json_" if kind == "json" else kind)) is not None}
    if len(given) + bool(so.json_object) != 1:
        raise bad_request("structured_outputs takes exactly one of json, regex, choice, "
                          "grammar or json_object.", "structured_outputs")
    if so.json_object:
        return "structured_outputs", Guide("json", JSON_OBJECT_SCHEMA)
    [(kind, value)] = given.items()
    return "structured_outputs", _guide_of(kind, value, f"structured_outputs.{kind}")
