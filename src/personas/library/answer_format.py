"""What shape an answer must take: valid JSON for a schema, any JSON object, a regular expression,
or a Lark grammar — compiled and checked by llguidance, whose matchers the decode engine then
follows token by token (engine/slot_grammar.py). No torch here: formats are read and checked
before a model loads, from flags, persona files, prompts files and requests alike.

Why llguidance rather than xgrammar or our own grammar engine: it is one abi3 wheel without
dependencies, takes JSON Schema, regular expressions and Lark grammars alike, computes a row's
allowed tokens lazily (no per-grammar precompilation over the vocabulary, which matters when
every request may bring its own schema), and fills many rows' masks in parallel off the GIL.

JSON is compact unless a schema asks otherwise: with flexible whitespace a sampler that wanders
may put newlines between tokens until max_new_tokens runs out (docs/performance.md). A schema
that wants it says so in llguidance's own key: `"x-guidance": {"whitespace_flexible": true}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal

Kind = Literal["json_schema", "json_object", "regex", "lark"]
ANY_OBJECT = {"type": "object"}
COMPACT = {"whitespace_flexible": False}


@dataclass(frozen=True)
class AnswerFormat:
    """The shape every sample of a row must take. `source` is the schema's JSON text (its keys in
    the order given: an answer's properties come in the schema's order), the regular expression,
    or the Lark grammar."""

    kind: Kind
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> AnswerFormat:
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))

    @classmethod
    def json_object(cls) -> AnswerFormat:
        return cls("json_object")

    @property
    def is_json(self) -> bool:
        """Its answers are JSON texts (records then carry the parsed value)."""
        return self.kind in ("json_schema", "json_object")

    @cached_property
    def grammar(self) -> str:
        """The format as an llguidance grammar (a JSON text its matchers take)."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(json.loads(self.source), defaults=COMPACT)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema(ANY_OBJECT, defaults=COMPACT)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        return LLMatcher.grammar_from_lark(self.source)

    def problem(self) -> str | None:
        """What llguidance refuses in this format (a keyword, a position), or None when it compiles."""
        return _problem(self)


# A batch file or a server sees the same format on line after line: it is compiled and checked once.
@lru_cache(maxsize=256)
def _problem(answer_format: AnswerFormat) -> str | None:
    from llguidance import LLMatcher

    try:
        grammar = answer_format.grammar
    except Exception as e:  # llguidance raises ValueError or its own errors for bad input
        return _one_line(str(e))
    error = LLMatcher.validate_grammar(grammar)
    return _one_line(error) if error else None


def _one_line(message: str) -> str:
    """llguidance's message on one line, without the excerpt of the source it draws below it."""
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not EXCERPT.match(line)]
    return "; ".join(kept)[:300]


POSITION = re.compile(r"^(?:at )?(\d+)\((\d+)\): ")  # llguidance's "line(column): "
EXCERPT = re.compile(r"^(\d+ \||[\^\s]+$)")  # "  12 | the line" and the "   ^" under it


def checked(answer_format: AnswerFormat) -> AnswerFormat:
    """The format, or ValueError naming what llguidance refuses in it."""
    problem = answer_format.problem()
    if problem:
        if answer_format.kind == "lark":
            problem = POSITION.sub(r"line \1 column \2: ", problem)
        else:  # the position is in the grammar llguidance wrapped around the user's text
            problem = POSITION.sub("", problem)
        raise ValueError(f"{KIND_NAMES[answer_format.kind]} refused: {problem}")
    return answer_format


KIND_NAMES = {"json_schema": "the JSON schema", "json_object": "the JSON format", "regex": "the regular expression",
              "lark": "the grammar"}


def schema_value(value: Any, folder: Path | None = None) -> dict[str, Any]:
    """A JSON schema given as an object, as JSON text, or as the path of a file holding one
    (relative to `folder`); ValueError saying which it was meant to be and what is wrong."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a JSON schema must be an object, JSON text or a file's path")
    text = value.strip()
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if folder is not None and not path.is_absolute():
            path = folder / path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read the schema file {path}: {e.strerror or e}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the schema is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(schema, dict):
        raise ValueError("a JSON schema must be a JSON object")
    return schema


def from_schema(value: Any, folder: Path | None = None) -> AnswerFormat:
    """A checked json_schema format from `schema_value`'s forms."""
    return checked(AnswerFormat.json_schema(schema_value(value, folder)))


def from_response_format(value: Any) -> AnswerFormat | None:
    """OpenAI's `response_format`: {"type": "text"} (None), {"type": "json_object"}, or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}; ValueError otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError("response_format must be an object with a 'type'")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return AnswerFormat.json_object()
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise ValueError("response_format: json_schema needs {\"name\": ..., \"schema\": {...}}")
        return from_schema(inner["schema"])
    raise ValueError(f"response_format type '{kind}' is not supported: use 'text', 'json_object' or 'json_schema'")
