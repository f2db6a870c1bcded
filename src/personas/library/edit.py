"""Adding personas to a persona file without disturbing what is there.

A new persona is appended as `[personas.NAME]` after the file's last byte, so every existing
line, comment and its order stay exactly as they were; one that replaces a persona of the same
name (`--force`) is swapped in place by tomlkit, the round-trip TOML library (its own comments
go with it). The result is read back as a persona file, and the imported fields compared with
what was meant, before it is written to a temporary file and renamed over the old one: a
failure leaves the file untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tomlkit

from ..errors import InputError, PersonasError
from .load import parse_library, read_toml
from .sources import Imported


@dataclass(frozen=True)
class Added:
    """One persona written: its name, whether it replaced another, and where it came from."""

    imported: Imported
    replaced: bool


def clean(text: str) -> str:
    """Windows line ends made plain, outer white space trimmed: TOML keeps a bare CR only escaped."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _string(text: str) -> tomlkit.items.String:
    return tomlkit.string(text, multiline="\n" in text)


def persona_table(persona: Imported) -> tomlkit.items.Table:
    table = tomlkit.table()
    if persona.description:
        table.add("description", _string(clean(persona.description)))
    table.add("system", _string(clean(persona.system)))
    if persona.opener:
        table.add("opener", _string(clean(persona.opener)))
    if persona.examples:
        examples = tomlkit.aot()
        for user, answer in persona.examples:
            example = tomlkit.table()
            example.add("user", _string(clean(user)))
            example.add("assistant", _string(clean(answer)))
            examples.append(example)
        table.add("examples", examples)
    return table


def add_personas(path: Path, personas: Sequence[Imported], force: bool = False) -> list[Added]:
    """Write `personas` into the persona file at `path` (created if missing); see the module."""
    names = [p.name for p in personas]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise InputError(f"two sources give the persona name '{twice[0]}'", "import them one at a time with --name")
    if path.is_dir() or not path.parent.is_dir():
        raise InputError(f"cannot write {path}: " + ("it is a folder" if path.is_dir() else
                         f"the folder {path.parent} does not exist"), "give a persona file's path")
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}", "check the file") from None
    read_toml(text, path)  # a syntax error is reported at its line, as everywhere else
    document = tomlkit.parse(text)

    existing = document.get("personas", {})
    added, appended = [], []
    for persona in personas:
        if persona.name in existing:
            if not force:
                raise InputError(f"{path} already has a persona '{persona.name}'",
                                 "pass --force to replace it, or --name to import it under another name")
            existing[persona.name] = persona_table(persona)
            added.append(Added(persona, replaced=True))
        else:
            appended.append(persona)
            added.append(Added(persona, replaced=False))
    new_text = tomlkit.dumps(document)
    if appended:
        section = tomlkit.document()
        shelf = tomlkit.table(is_super_table=True)
        for persona in appended:
            shelf.add(persona.name, persona_table(persona))
        section.add("personas", shelf)
        new_text = (new_text.rstrip("\n") + "\n\n" if new_text.strip() else "") + tomlkit.dumps(section)
    new_text = new_text if new_text.endswith("\n") else new_text + "\n"

    _check(new_text, path, personas)
    _replace(path, new_text)
    return added


def _check(text: str, path: Path, personas: Sequence[Imported]) -> None:
    """The new file reads back as a persona file holding exactly what was imported."""
    library = parse_library(text, path)
    for persona in personas:
        got = library.personas[persona.name]
        meant = (clean(persona.system), clean(persona.opener) if persona.opener else None,
                 [(clean(u), clean(a)) for u, a in persona.examples])
        if (got.system, got.opener, [(e.user, e.assistant) for e in got.examples]) != meant:
            raise PersonasError(f"persona '{persona.name}' did not survive being written as TOML; nothing was written",
                                "please report it, with the source file")


def _replace(path: Path, text: str) -> None:
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(temporary, path)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror}", "check the folder's permissions") from None
