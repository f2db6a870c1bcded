"""Error messages that point at file and line.

tomllib keeps no positions, so `KeyLines` re-reads the text to find the line of each table and
key; it only has to be good enough to point a person at the right place, so it understands
headers and `key =` lines and nothing more exotic (dotted keys fall back to the enclosing
table's line). `file_error` turns pydantic's first problem into one such message.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from ..errors import PersonaFileError


def file_error(path: Path, lines: KeyLines, error: ValidationError, root: type[BaseModel],
               prefix: tuple[str, ...] = ()) -> PersonaFileError:
    """The first problem of `error` (raised validating `root` at `prefix`) as a file:line error."""
    # A misspelt key also shows up as a missing one; the misspelling is the one worth reporting.
    problems = sorted(error.errors(), key=lambda p: p["type"] != "extra_forbidden")
    first = problems[0]
    loc = tuple(str(p) for p in first["loc"])
    full = prefix + loc
    where = f"{prefix[0].removesuffix('s')} '{prefix[1]}': " if prefix else ""
    field_name = ".".join(loc) or "(file)"
    if first["type"] == "extra_forbidden":
        what = f"{where}{'.'.join(loc[:-1]) + ': ' if loc[:-1] else ''}unknown key '{loc[-1]}'"
        model = model_at(root, first["loc"][:-1])
        # The table's own keys first, then those it shares (the logits rules).
        own = vars(model).get("__annotations__", {}) if model else {}
        known = sorted((k for k in model.model_fields if k != "name"), key=lambda k: k not in own) if model else []
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


def line_from_message(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None


def strip_position(message: str) -> str:
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
