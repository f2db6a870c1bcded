"""Personas in TOML: the model, the loader, and validation messages that point at file and line.

tomllib parses; pydantic validates (unknown keys are errors). tomllib keeps no positions, so
`KeyLines` re-reads the text to find the line of each table and key; it only has to be good
enough to point a person at the right place, so it understands headers and `key =` lines and
nothing more exotic (dotted keys fall back to the enclosing table's line).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InputError, PersonaFileError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Example(_Strict):
    """One few-shot exchange: what the user said and how the persona answered."""

    user: str
    assistant: str

    _check = field_validator("user", "assistant")(_not_blank)


class Persona(_Strict):
    name: str
    description: str | None = None  # one line for `personas list`
    system: str | None = None
    prompt: str | None = None  # used when no --prompt is given
    examples: list[Example] = Field(default_factory=list)
    temperature: Temperature | None = None  # this persona's voice in `chat` (not used by `generate`)

    _check = field_validator("system", "prompt", "description")(_not_blank)


class Defaults(_Strict):
    """`[defaults]`: what `generate` uses when a flag is not given."""

    model: str | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperatures: list[Temperature] | None = Field(default=None, min_length=1)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)


class _File(_Strict):
    defaults: Defaults = Field(default_factory=Defaults)
    personas: dict[str, Any] = Field(default_factory=dict)  # each checked on its own, below
    games: dict[str, Any] = Field(default_factory=dict)  # checked by games.py, against the personas


@dataclass(frozen=True)
class Library:
    path: Path
    defaults: Defaults
    personas: dict[str, Persona] = field(default_factory=dict)
    games: dict[str, Any] = field(default_factory=dict)  # name -> games.Game

    def game(self, name: str) -> Any:
        if name not in self.games:
            raise self._unknown("game", name, self.games,
                                None if self.games else "add a [games.NAME] table (README: Games)")
        return self.games[name]

    def get(self, name: str) -> Persona:
        if name not in self.personas:
            raise self._unknown("persona", name, self.personas)
        return self.personas[name]

    def _unknown(self, kind: str, name: str, known: dict, empty_hint: str | None = None) -> InputError:
        """An unknown name, with the closest known ones (or all of them) as the hint."""
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
                else empty_hint or f"known {kind}s: {', '.join(known)}")
        return InputError(f"unknown {kind} '{name}' in {self.path}", hint)


# --- finding the file --------------------------------------------------------------------------


def candidate_paths() -> list[Path]:
    """Where a persona file is looked for when `--file` is not given, in order."""
    paths = []
    if env := os.environ.get("PERSONAS_FILE"):
        paths.append(Path(env))
    paths.append(Path.cwd() / "personas.toml")
    # An editable install runs from the source tree, whose root holds the shipped library;
    # a wheel carries a copy inside the package (see pyproject's force-include).
    paths.append(Path(__file__).resolve().parents[2] / "personas.toml")
    paths.append(Path(str(resources.files("personas") / "personas.toml")))
    return paths


def find_library_file(explicit: Path | None) -> Path:
    if explicit is not None:
        if not explicit.is_file():
            raise InputError(f"persona file not found: {explicit}", "check the --file path")
        return explicit
    looked = candidate_paths()
    for path in looked:
        if path.is_file():
            return path
    raise InputError(
        "no persona file found (looked in: " + ", ".join(str(p) for p in looked) + ")",
        "pass --file PATH or create personas.toml here",
    )


# --- loading and validating --------------------------------------------------------------------


def load_library(path: Path) -> Library:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PersonaFileError(str(path), None, f"not UTF-8 text ({e.reason} at byte {e.start})",
                               "save the file as UTF-8") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}", "check the path") from None
    return parse_library(text, path)


def parse_library(text: str, path: Path) -> Library:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = getattr(e, "lineno", None) or _line_from_message(str(e))
        if line is None and "end of document" in str(e):
            line = len(text.splitlines()) or 1
        raise PersonaFileError(str(path), line, f"invalid TOML: {_strip_position(str(e))}",
                               "fix the TOML syntax") from None

    lines = KeyLines(text)
    try:
        top = _File.model_validate(data)
    except ValidationError as e:
        raise file_error(path, lines, e) from None
    if not top.personas:
        raise PersonaFileError(str(path), None, "no personas defined",
                               "add a [personas.NAME] table")

    personas = {name: validate_table(Persona, "persona", name, body, path, lines)
                for name, body in top.personas.items()}
    from .games import Game, check_game  # games are built on personas, so they come second

    games = {}
    for name, body in top.games.items():
        games[name] = validate_table(Game, "game", name, body, path, lines)
        check_game(games[name], personas, path, lines)
    return Library(path=path, defaults=top.defaults, personas=personas, games=games)


def validate_table(model: type[BaseModel], kind: str, name: str, body: Any, path: Path,
                   lines: KeyLines) -> Any:
    """One `[{kind}s.NAME]` table validated as `model`, with file:line errors."""
    where = (f"{kind}s", name)
    if not re.match(NAME_PATTERN, name):
        raise PersonaFileError(str(path), lines.find(where), f"{kind} name '{name}' is not allowed",
                               "use letters, digits, '_', '-' and '.', starting with a letter or digit")
    if not isinstance(body, dict):
        raise PersonaFileError(str(path), lines.find(where), f"{kind} '{name}' must be a table",
                               f"write it as [{kind}s.{name}]")
    try:
        return model.model_validate({**body, "name": name})
    except ValidationError as e:
        raise file_error(path, lines, e, prefix=where, root=model) from None


def file_error(path: Path, lines: KeyLines, error: ValidationError, prefix: tuple[str, ...] = (),
               root: type[BaseModel] | None = None) -> PersonaFileError:
    # A misspelt key also shows up as a missing one; the misspelling is the one worth reporting.
    problems = sorted(error.errors(), key=lambda p: p["type"] != "extra_forbidden")
    first = problems[0]
    loc = tuple(str(p) for p in first["loc"])
    full = prefix + loc
    where = f"{prefix[0].removesuffix('s')} '{prefix[1]}': " if prefix else ""
    field_name = ".".join(loc) or "(file)"
    if first["type"] == "extra_forbidden":
        what = f"{where}{'.'.join(loc[:-1]) + ': ' if loc[:-1] else ''}unknown key '{loc[-1]}'"
        model = model_at(root or _File, first["loc"][:-1])
        known = [k for k in model.model_fields if k != "name"] if model else []
        todo = "known keys: " + ", ".join(known)
    elif first["type"] == "missing":
        what = f"{where}{field_name}: missing"
        todo = f"add '{loc[-1]}'"
    else:
        what = f"{where}{field_name}: {first['msg'].removeprefix('Value error, ')}"
        todo = "fix the value"
    others = [p for p in problems[1:] if not (  # the missing twin of a misspelt key
        first["type"] == "extra_forbidden" and p["type"] == "missing" and p["loc"][:-1] == first["loc"][:-1])]
    if others:
        what += f" (and {len(others)} more problem{'s' if len(others) > 1 else ''})"
    return PersonaFileError(str(path), lines.find(full), what, todo)


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that validates the table at `loc` (for naming its known keys)."""
    current: Any = root
    for part in loc:
        current = _element(current, part)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _element(annotation: Any, part: Any) -> Any:
    """One step into a type: a model's field, a list's item, a dict's value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field_info = annotation.model_fields.get(str(part))
        return _unwrap(field_info.annotation) if field_info else None
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (list, tuple) and args:
        return _unwrap(args[0])
    if typing.get_origin(annotation) is dict and len(args) == 2:
        return _unwrap(args[1])
    return None


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / Annotated[X, ...] -> X (the first model or container among the options)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        options = [_unwrap(a) for a in typing.get_args(annotation) if a is not type(None)]
        return next((o for o in options if typing.get_origin(o) or (isinstance(o, type) and issubclass(o, BaseModel))),
                    options[0] if options else None)
    return annotation


def _line_from_message(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None


def _strip_position(message: str) -> str:
    return re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", message)


class KeyLines:
    """Line numbers (from 1) of TOML tables and keys, for error messages."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")
    _KEY = re.compile(r"^\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*=")

    def __init__(self, text: str):
        self._lines: dict[tuple[str, ...], int] = {}
        self._array_counts: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), start=1):
            if header := self._HEADER.match(line):
                table = tuple(_unquote(p.strip()) for p in header.group(1).split("."))
                for end in range(1, len(table)):  # [a.b] also opens a
                    self._lines.setdefault(table[:end], number)
                if line.lstrip().startswith("[["):
                    index = self._array_counts.get(table, 0)
                    self._array_counts[table] = index + 1
                    self._lines.setdefault(table, number)
                    table = table + (str(index),)
                self._lines.setdefault(table, number)
            elif key := self._KEY.match(line):
                self._lines.setdefault(table + (_unquote(key.group(1)),), number)

    def find(self, loc: tuple[str, ...]) -> int | None:
        """The line of `loc`, or of the nearest enclosing table or key that has one."""
        for end in range(len(loc), 0, -1):
            if (line := self._lines.get(loc[:end])) is not None:
                return line
        return None


def _unquote(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] and key[0] in "\"'" else key
