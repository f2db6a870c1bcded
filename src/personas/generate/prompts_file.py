"""`--prompts-file`: many prompts in one grid, from a file or stdin.

Two forms, told apart by the first non-blank line:

* plain text: one prompt per line (blank lines skipped); each runs on the command's personas;
* JSONL: one object per line, `{"prompt": ..., "persona": ..., "temperatures": [...], "n": ...,
  "seed": ..., "max_new_tokens": ..., "id": ...}` and the logits rules a persona may set
  (`min_p`, `presence_penalty`, `logit_bias`, …, `json_schema` — or OpenAI's `response_format`),
  only `prompt` required; unknown keys are errors.
  A line may carry its persona inline — `system` and/or `examples` (`[{"user", "assistant"}]`),
  `persona` then only its name in the output (default "inline") — for personas kept as data
  (PersonaHub's one-line personas), not in a TOML library.

Every row carries its line's `id`, or the line number (from 1) when it has none. Errors name
the file and line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import InputError, PersonaFileError
from ..library.answer_format import from_response_format
from ..library.load import Library
from ..library.schema import Example, Persona, RuleFields, Temperature
from ..sampling.grid import NO_RULES, Rules, rules_from
from .request import Cell

INLINE = "inline"  # the name of a line's inline persona when the line gives none


class PromptLine(RuleFields):
    """One JSONL line of a prompts file: a prompt, and what it sets for itself (the logits rules
    too, as a persona file writes them)."""

    prompt: str
    persona: str | None = None
    temperatures: list[Temperature] | None = Field(default=None, min_length=1)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0)
    max_new_tokens: int | None = Field(default=None, ge=1)
    id: str | int | None = None
    system: str | None = None  # an inline persona: its system context ...
    examples: list[Example] | None = None  # ... and few-shot exchanges
    response_format: dict[str, Any] | None = None  # OpenAI's, beside json_schema (RuleFields)

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from_response_format(value)  # checked now; read again by `answer_format`
        return value

    @model_validator(mode="after")
    def _one_format(self) -> PromptLine:
        if self.response_format is not None and self.json_schema is not None:
            raise ValueError("json_schema and response_format cannot be combined: choose one")
        return self

    def rules(self) -> Rules:
        """The line's own rules, its answer format from json_schema or response_format."""
        rules = rules_from(self)
        if self.response_format is not None:
            rules = replace(rules, answer_format=from_response_format(self.response_format))
        return rules

    @field_validator("prompt", "system")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value


def read_source(source: str) -> tuple[str, str]:
    """(name for messages, text) of a path or '-' for stdin; the bytes must be UTF-8."""
    name = "<stdin>" if source == "-" else source
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read prompts file {source}: {e.strerror}", "check the path") from None
    try:
        return name, data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PersonaFileError(name, line, f"not UTF-8 text ({e.reason})", "save the file as UTF-8") from None


def parse_prompts(name: str, text: str, library: Library, personas: Sequence[Persona]) -> list[Cell]:
    """The file's cells: one per line and persona (the line's own persona, else `personas`)."""
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    jsonl = first.lstrip().startswith("{")
    cells: list[Cell] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            cells += [Cell(p, line, id=number) for p in personas]
            continue
        try:
            item = PromptLine.model_validate(json.loads(line))
        except json.JSONDecodeError as e:
            raise PersonaFileError(name, number, f"not valid JSON ({e.msg})",
                                   "write one JSON object per line") from None
        except ValidationError as e:
            problem = e.errors()[0]
            where = ".".join(str(p) for p in problem["loc"]) or "line"
            what = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"].removeprefix(
                "Value error, ")
            raise PersonaFileError(name, number, f"{where}: {what}",
                                   "keys: " + ", ".join(PromptLine.model_fields)) from None
        try:
            if item.system is not None or item.examples:
                targets = [Persona(name=item.persona or INLINE, system=item.system, examples=item.examples or [])]
            else:
                targets = [library.get(item.persona)] if item.persona else list(personas)
        except InputError as e:
            raise PersonaFileError(name, number, e.what, e.todo) from None
        temperatures = tuple(item.temperatures) if item.temperatures else None
        rules = item.rules()
        cells += [Cell(p, item.prompt, temperatures, item.n, item.seed, item.id if item.id is not None else number,
                       item.max_new_tokens, rules if rules != NO_RULES else None) for p in targets]
    if not cells:
        raise InputError(f"no prompts in {name}", "write one prompt per line, or JSONL objects with a prompt")
    return cells
