"""Finding the persona file and reading it into a `Library`: parse (tomllib), validate
(pydantic; unknown keys are errors), and report problems at file and line."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from ..errors import InputError, PersonaFileError
from .games import Game, check_game
from .schema import NAME_PATTERN, Defaults, Persona, Strict
from .toml_lines import KeyLines, file_error, line_from_message, strip_position


class _File(Strict):
    defaults: Defaults = Field(default_factory=Defaults)
    personas: dict[str, Any] = Field(default_factory=dict)  # each checked on its own, below
    games: dict[str, Any] = Field(default_factory=dict)  # checked after the personas they name


@dataclass(frozen=True)
class Library:
    """A persona file, read and checked: its defaults, personas and games, by name."""

    path: Path
    defaults: Defaults
    personas: dict[str, Persona] = field(default_factory=dict)
    games: dict[str, Game] = field(default_factory=dict)

    def game(self, name: str) -> Game:
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
    paths.append(Path(__file__).resolve().parents[3] / "personas.toml")
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


def read_toml(text: str, path: Path) -> dict[str, Any]:
    """The TOML document, or a file:line error for its first syntax error."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = getattr(e, "lineno", None) or line_from_message(str(e))
        if line is None and "end of document" in str(e):
            line = len(text.splitlines()) or 1
        raise PersonaFileError(str(path), line, f"invalid TOML: {strip_position(str(e))}",
                               "fix the TOML syntax") from None


def parse_library(text: str, path: Path) -> Library:
    data = read_toml(text, path)
    lines = KeyLines(text)
    try:
        top = _File.model_validate(data, context={"folder": path.parent})
    except ValidationError as e:
        raise file_error(path, lines, e, root=_File) from None
    if not top.personas:
        raise PersonaFileError(str(path), None, "no personas defined",
                               "add a [personas.NAME] table")

    personas = {name: validate_table(Persona, "persona", name, body, path, lines)
                for name, body in top.personas.items()}
    games = {}  # games name personas, so they come second
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
        return model.model_validate({**body, "name": name}, context={"folder": path.parent})
    except ValidationError as e:
        raise file_error(path, lines, e, root=model, prefix=where) from None
